"""Build the tiny Qwen3 models (dense and MoE) and their tokenizer from scratch, on a CPU.

    python -m tiny.build                 # rebuild tiny/dense, tiny/moe and tiny/build.json in place
    python -m tiny.build --verify        # rebuild into a temporary folder, compare every file's hash

The recipe, and why (each choice was measured on a 2-core CPU; see build.json):

- Tokenizer: byte-level BPE with Qwen2's pre-tokenizer regex, trained on the
  articles with every value an answer copies (name parts, occupations,
  places, charges) cut out, plus those values on their own, and with
  Japanese punctuation and quotes split from the words. A merge then
  never spans a value's edge, so a name is the same tokens in the article as
  in the answer. Merged freely over the articles instead, 81% of names were
  not (e.g. `修`+`介容疑者`), nor were places (`、広島市中区`): the answer's
  tokens never occur in the context, and no model can copy them.
- Copy warm-up: short chats whose answer repeats the user's random string of
  those values and digits. This forms the
  copying heads; without it the article tasks below did not leave chance
  level (teacher-forced name-token accuracy 0.05 after 400 steps).
- Pre-training: batches of single documents (never packed: with several
  articles in a row the copying had to pick among their names): plain
  articles, and a side task that lists every person an article names, with
  the age, occupation and address the article gives them, and every charge
  it names. That is the reading a real base model brings; which people are
  offenders, and which charge is theirs, are left for the fine-tune to learn
  (without the charges here, the fine-tuned MoE answered 傷害, the commonest
  charge, for 40% of offenders).
- The MoE starts from the dense model (embeddings, attention and norms, and
  each expert from a slice of the dense MLP), then trains on the same mix.

Only the `pretrain` split of the generator is used, with training-side names:
no validation article or held-out name is seen. Everything is seeded and runs
on a fixed number of threads, so a rebuild on the same machine type and
library versions reproduces every file bit for bit (`--verify`).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import platform
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from core.prompt import QWEN3_2507_CHAT_TEMPLATE, default_instruction, prompt_messages
from data_tools import synth
from tiny import BUILD_RECORD, HOME

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
PEOPLE_INSTRUCTION = "次の記事に名前が出てくる人物と、記事にある容疑・罪名を、登場順にすべてJSONで挙げてください。"
TITLES = "容疑者|被告|さん|選手|監督|氏|市長|副署長|裁判長"
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja")


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 3000
    hidden_size: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 192
    max_positions: int = 2048
    articles: int = 6000
    copy_steps: int = 800
    copy_batch: int = 16
    copy_lr: float = 1e-3
    batch_size: int = 16
    lr: float = 2e-3
    listing_share: float = 0.8  # the rest: plain articles
    dense_steps: int = 1000
    moe_steps: int = 400
    threads: int = 2
    seed: int = 0


def recipe_hash(spec: TinySpec) -> str:
    """Everything a build depends on besides the library versions: the spec and the source files."""
    root = HOME.parent
    h = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for rel in ("tiny/build.py", "data_tools/synth.py", "core/prompt.py"):
        h.update((root / rel).read_bytes())
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    return {f"{sub}/{name}": hashlib.sha256((folder / sub / name).read_bytes()).hexdigest()
            for sub in ("dense", "moe") for name in SHIPPED_FILES}


# ---------------------------------------------------------------- corpus

@dataclass
class Article:
    text: str
    people: list  # synth.Person, in order of appearance


def articles(spec: TinySpec) -> list[Article]:
    out = []
    for kind in ("positive", "negative"):
        table = synth.POSITIVE_SHAPES if kind == "positive" else synth.NEGATIVE_SHAPES
        for i in range(spec.articles // 2):
            rng = random.Random(f"{spec.seed}:pretrain:{kind}:{i}")
            shape = rng.choice(synth.shapes_for(kind))
            article = synth.Article(rng, held_out_names=False)
            text, _ = table[shape](article)
            out.append(Article(text, sorted(article.people, key=lambda p: text.find(p.name))))
    return out


def people_facts(a: Article) -> list[dict]:
    """Every person the article names, with the attributes the text gives next to the name."""
    facts = []
    for p in a.people:
        age = re.search(re.escape(p.name) + f"(?:{TITLES})" + r"[（(]([0-9０-９]+)[）)]", a.text)
        occupation = next((o for o in (p.occupation, (p.occupation or "").removeprefix("自称"))
                           if o and re.search(re.escape(o) + "の?" + re.escape(p.name), a.text)), None)
        lives = p.address and (re.search(re.escape(p.address) + "[、の][^、。]{0,8}" + re.escape(p.name), a.text)
                               or re.search(f"{re.escape(p.name)}容疑者.*自宅は{re.escape(p.address)}", a.text))
        facts.append({"name": p.name, "age": int(age.group(1).translate(_FULL_WIDTH)) if age else None,
                      "occupation": occupation, "address": p.address if lives else None})
    return facts


_FULL_WIDTH = str.maketrans("０１２３４５６７８９", "0123456789")


def charges(text: str) -> list[str]:
    """The charges an article names, in order (longest match first: 特殊詐欺（受け子）, not 詐欺)."""
    names = sorted({c[0] for c in synth.CRIMES}, key=lambda c: (-len(c), c))
    found = [m.group(0) for m in re.finditer("|".join(map(re.escape, names)), text)]
    return list(dict.fromkeys(found))


def listing_answer(a: Article) -> str:
    return json.dumps({"people": people_facts(a), "charges": charges(a.text)}, ensure_ascii=False)


def listing_chat(a: Article) -> list[dict]:
    answer = listing_answer(a)
    return prompt_messages(PEOPLE_INSTRUCTION, a.text) + [{"role": "assistant", "content": answer}]


def copied_values() -> list[str]:
    """Every string an answer copies from an article (name parts, occupations, places, charges), longest first."""
    values = (set(synth.SURNAMES) | {g for g, _ in synth.GIVEN_NAMES} | set(synth.OCCUPATIONS)
              | {o.removeprefix("自称") for o in synth.OCCUPATIONS} | {a[1] for a in synth.AREAS}
              | {c[0] for c in synth.CRIMES})
    return sorted(values, key=lambda v: (-len(v), v))


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(corpus: list[Article], spec: TinySpec):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer
    from tokenizers import AddedToken

    values = copied_values()
    cut = re.compile("|".join(map(re.escape, values)))
    texts = [cut.sub("\n", a.text) for a in corpus]
    texts += [cut.sub("\n", listing_answer(a)) for a in corpus[: len(corpus) // 3]]
    instructions = [PEOPLE_INSTRUCTION, default_instruction()] * 20
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        # Japanese punctuation and quotes stand alone (Qwen's regex would glue them to the next word:
        # `、広島市中区` in the article, `"広島市中区` in the answer, two different tokens).
        pre_tokenizers.Split(Regex(r"[、。「」（）()\"]"), behavior="isolated"),
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts + values + instructions, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    # As in Qwen3: think tags are whole tokens, but not special (decode keeps them).
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.chat_template = QWEN3_2507_CHAT_TEMPLATE
    tok.model_max_length = spec.max_positions
    return tok


# ---------------------------------------------------------------- models

def dense_config(spec: TinySpec, tok):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id, rope_theta=10000.0)


def moe_config(spec: TinySpec, tok):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        moe_intermediate_size=spec.moe_intermediate_size, num_experts=spec.experts,
        num_experts_per_tok=spec.experts_per_token, decoder_sparse_step=1, mlp_only_layers=[],
        norm_topk_prob=True, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
        rope_theta=10000.0)


def chat_row(tok, chat: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the loss on the assistant answer only."""
    prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
    full = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
    return full, [-100] * len(prompt) + full[len(prompt):]


def train_steps(model, tok, next_row, steps: int, batch: int, lr: float, label: str,
                schedule: bool = True) -> float:
    """AdamW over padded batches of single documents; constant lr, cosine over the last 30% when
    `schedule`. Returns the mean loss of the last 50 steps."""
    import torch
    from tqdm import tqdm

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    tail = 0.3 * steps

    def factor(s):
        if not schedule:
            return 1.0
        warm = min(1.0, (s + 1) / max(1, steps // 20))
        return warm if s < steps - tail else 0.5 * (1 + math.cos(math.pi * (s - (steps - tail)) / tail))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    model.train()
    recent = []
    bar = tqdm(range(steps), desc=label, unit="step", leave=False, disable=None)
    for _ in bar:
        rows = [next_row() for _ in range(batch)]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (width - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        recent = (recent + [loss.item()])[-50:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}")
    model.eval()
    return round(sum(recent) / len(recent), 4)


def copy_row_source(tok, spec: TinySpec):
    pieces = copied_values() + list("0123456789")
    rng = random.Random(spec.seed + 1)

    def row():
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(2, 8)))
        return chat_row(tok, [{"role": "user", "content": text}, {"role": "assistant", "content": text}])
    return row


def corpus_row_source(tok, corpus: list[Article], spec: TinySpec, seed: int):
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    plain = [tok(a.text)["input_ids"] + [eot] for a in corpus]
    listing = [chat_row(tok, listing_chat(a)) for a in corpus]
    rng = random.Random(seed)

    def row():
        if rng.random() < spec.listing_share:
            return rng.choice(listing)
        ids = rng.choice(plain)
        return ids, ids
    return row


def upcycle(moe, dense, spec: TinySpec) -> None:
    """The MoE starts as the dense model: shared shapes copied, expert e = slice e % k of the dense MLP."""
    import torch

    own = moe.state_dict()
    moe.load_state_dict({k: v for k, v in dense.state_dict().items() if k in own and own[k].shape == v.shape},
                        strict=False)
    width, slices = spec.moe_intermediate_size, spec.intermediate_size // spec.moe_intermediate_size
    with torch.no_grad():
        for dl, ml in zip(dense.model.layers, moe.model.layers):
            gate, up, down = dl.mlp.gate_proj.weight, dl.mlp.up_proj.weight, dl.mlp.down_proj.weight
            for e in range(spec.experts):
                s = slice((e % slices) * width, (e % slices + 1) * width)
                ml.mlp.experts.gate_up_proj[e].copy_(torch.cat([gate[s], up[s]]))
                ml.mlp.experts.down_proj[e].copy_(down[:, s] * slices / spec.experts_per_token)


def build(spec: TinySpec, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.set_num_threads(spec.threads)
    torch.use_deterministic_algorithms(True)
    timings, losses = {}, {}
    t0 = time.perf_counter()
    corpus = articles(spec)
    tok = train_tokenizer(corpus, spec)
    timings["corpus_and_tokenizer_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    dense = AutoModelForCausalLM.from_config(dense_config(spec, tok), dtype=torch.float32)
    losses["copy_warmup"] = train_steps(dense, tok, copy_row_source(tok, spec), spec.copy_steps,
                                        spec.copy_batch, spec.copy_lr, "copy warm-up", schedule=False)
    losses["dense"] = train_steps(dense, tok, corpus_row_source(tok, corpus, spec, spec.seed + 2),
                                  spec.dense_steps, spec.batch_size, spec.lr, "pre-training dense")
    timings["dense_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    torch.manual_seed(spec.seed)
    moe = AutoModelForCausalLM.from_config(moe_config(spec, tok), dtype=torch.float32)
    upcycle(moe, dense, spec)
    losses["moe"] = train_steps(moe, tok, corpus_row_source(tok, corpus, spec, spec.seed + 3),
                                spec.moe_steps, spec.batch_size, spec.lr, "pre-training moe")
    timings["moe_s"] = round(time.perf_counter() - t0, 1)

    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    for name, model in (("dense", dense), ("moe", moe)):
        model.generation_config = GenerationConfig(eos_token_id=stop, pad_token_id=tok.pad_token_id,
                                                   do_sample=False)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    import tokenizers
    import transformers

    return {"recipe_sha256": recipe_hash(spec), "spec": dataclasses.asdict(spec),
            "files_sha256": file_hashes(out), "final_losses": losses, "timings": timings,
            "built_with": {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                           "machine": platform.machine(), "processor": _cpu_name(), "threads": spec.threads}}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tiny.build", description=__doc__.split("\n\n")[0])
    p.add_argument("--verify", action="store_true",
                   help="rebuild into a temporary folder and compare every file with the shipped one")
    args = p.parse_args(argv)
    spec = TinySpec()
    with tempfile.TemporaryDirectory(prefix="tiny-build-") as tmp:
        started = time.perf_counter()
        record = build(spec, Path(tmp))
        print(f"built in {time.perf_counter() - started:.0f}s; losses {record['final_losses']}")
        if args.verify:
            shipped = json.loads(BUILD_RECORD.read_text())["files_sha256"]
            differ = sorted(k for k, v in record["files_sha256"].items() if shipped.get(k) != v)
            if differ:
                print(f"differ from the shipped build: {', '.join(differ)}", file=sys.stderr)
                return 1
            print("every file is identical to the shipped build")
            return 0
        for name in ("dense", "moe"):
            shutil.rmtree(HOME / name, ignore_errors=True)
            shutil.copytree(Path(tmp) / name, HOME / name)
        tmp_record = BUILD_RECORD.with_suffix(".json.tmp")
        tmp_record.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        tmp_record.replace(BUILD_RECORD)
        print(f"wrote {HOME / 'dense'}, {HOME / 'moe'} and {BUILD_RECORD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
