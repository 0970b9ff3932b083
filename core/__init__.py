"""The shared base every stack and tool builds on: the record format and its reading and writing
(`records`, `formats`), the one prompt builder and chat template (`prompt`), the one metric
implementation (`metrics`, pure stdlib), redaction of secrets (`redact`), run info (`runinfo`),
rank and world size (`distributed`) and the user-error types (`errors`).

It imports nothing else of this repository, and Axolotl's environment imports it too (through
`callbacks`), so it needs only the standard library and what both environments have."""
