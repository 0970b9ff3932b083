"""Build the tiny offline Qwen3 models (dense and MoE) with their tokenizer.

No weights can be downloaded here, so tests, the demo and the benchmarks use
models made from scratch and saved with `save_pretrained`; everything later
loads them through the same `from_pretrained` path as a hub model.

- tokenizer: byte-level BPE (Qwen2's pre-tokenizer regex) trained on
  synthetic articles, with Qwen3's special tokens and a Qwen3-2507-style
  chat template;
- models: `Qwen3ForCausalLM` and `Qwen3MoeForCausalLM` (fused experts),
  pre-trained briefly on text that is not the extraction task (articles, and
  a side task listing every person an article names), so that a later LoRA
  fine-tune has something to build on. Pre-training uses the `pretrain`
  split of the generator with training-side names only: no validation
  article or name is seen.

The result is cached under $QWEN_FINETUNE_CACHE (default ~/.cache/qwen-finetune)
in a folder keyed by a hash of every input (this file, the generator, the
prompt builder, library versions), so a second build is instant.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")

# Qwen3-2507-Instruct style: no thinking block, one turn per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
KANJI_REGEX = r"\p{Han}"
PEOPLE_INSTRUCTION = "次の記事に名前が出てくる人物を、登場順にすべてJSONで挙げてください。"
REPEAT_INSTRUCTION = "次の文字列をそのまま繰り返してください。"


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 2000
    hidden_size: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    experts: int = 8
    experts_per_token: int = 2
    moe_intermediate_size: int = 256
    max_positions: int = 2048
    corpus_articles: int = 6000
    copy_tasks_per_article: int = 3
    block_size: int = 512
    batch_size: int = 8
    lr: float = 3e-3
    dense_steps: int = 300
    moe_steps: int = 120
    copy_warmup_steps: int = 1200
    copy_warmup_batch: int = 16
    copy_warmup_lr: float = 1e-3
    seed: int = 0


@dataclass(frozen=True)
class TinyModels:
    dense: Path
    moe: Path


def cache_root() -> Path:
    return Path(os.environ.get("QWEN_FINETUNE_CACHE", "~/.cache/qwen-finetune")).expanduser()


def _cache_key(spec: TinySpec) -> str:
    import tokenizers
    import torch
    import transformers

    here = Path(__file__).parent
    h = hashlib.sha256(json.dumps(dataclasses.asdict(spec), sort_keys=True).encode())
    for name in ("tiny_model.py", "synth.py", "prompt.py"):
        h.update((here / name).read_bytes())
    h.update(f"{torch.__version__}|{transformers.__version__}|{tokenizers.__version__}".encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- corpus

def pretraining_corpus(spec: TinySpec) -> tuple[list[str], list[list[dict]]]:
    """(plain article texts, side-task chats), training-side names only."""
    from data_tools import synth
    from data_tools.prompt import prompt_messages

    articles = [synth.write_article(spec.seed, "pretrain", kind, i, synth.shapes_for(kind), False)
                for kind in ("positive", "negative") for i in range(spec.corpus_articles // 2)]
    kanji = sorted({c for _, text, _, _ in articles for c in text if "\u4e00" <= c <= "\u9fff"})
    texts, chats = [], []
    rng = random.Random(spec.seed)
    for _, text, _, people in articles:
        texts.append(text)
        answer = json.dumps({"people": people}, ensure_ascii=False)
        chats.append(prompt_messages(PEOPLE_INSTRUCTION, text) + [{"role": "assistant", "content": answer}])
        # Uniformly random kanji: only copying predicts them, which makes
        # induction heads form within ~100 steps. Names alone do not: their
        # small alphabets let the model settle on a prior over names.
        for _ in range(spec.copy_tasks_per_article):
            chars = "".join(rng.choice(kanji) for _ in range(rng.randint(4, 24)))
            chats.append(prompt_messages(REPEAT_INSTRUCTION, chars) + [{"role": "assistant", "content": chars}])
    return texts, chats


# ---------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], spec: TinySpec, out_dir: Path):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    # Each kanji is its own pre-token, so every kanji gets one whole token: with
    # 2,000 tokens, free merging spends the vocabulary on template phrases and
    # leaves rarer name kanji as raw bytes, needlessly hard to copy for a tiny model.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(KANJI_REGEX), behavior="isolated"),
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    extra = [PEOPLE_INSTRUCTION, '{"people": [], "offenders": [{"name": null, "age": null}]}']
    bpe.train_from_iterator(texts + extra, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token=None)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    # As in Qwen3: think tags are whole tokens, but not special (decode keeps them).
    tok.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = spec.max_positions
    tok.save_pretrained(out_dir)
    return tok


# ---------------------------------------------------------------- models

def _dense_config(spec: TinySpec, tok):
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim, max_position_embeddings=spec.max_positions, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id, rope_theta=10000.0)


def _moe_config(spec: TinySpec, tok):
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


def token_stream(tok, texts: list[str], chats: list[list[dict]], seed: int) -> tuple[list[int], list[int]]:
    """Packed (input_ids, labels): articles train on every token, side-task chats
    on the answer only, which is where copying from the context is learnt."""
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    docs = []
    for t in texts:
        ids = tok(t)["input_ids"] + [eot]
        docs.append((ids, ids))
    for chat in chats:
        prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
        full = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
        docs.append((full, [-100] * len(prompt) + full[len(prompt):]))
    random.Random(seed).shuffle(docs)
    return [t for d in docs for t in d[0]], [t for d in docs for t in d[1]]


def copy_warmup(model, tok, kanji: list[str], spec: TinySpec) -> float:
    """Teach the model to copy before anything else: short, fresh chats whose
    answer repeats the user's random kanji. Measured on this 2-layer model:
    without a system prompt the copy loss falls from ~5.5 to <1 within ~1,000
    steps (induction heads form); with the long constant system prompt, or
    inside long packed blocks, it stayed at ~5.4 for 1,600 steps. Returns the
    last loss."""
    import torch
    from tqdm import tqdm

    rng = random.Random(spec.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.copy_warmup_lr)
    model.train()
    loss_value = float("nan")
    for _ in tqdm(range(spec.copy_warmup_steps), desc="copy warm-up", unit="step", leave=False, disable=None):
        rows = []
        for _ in range(spec.copy_warmup_batch):
            chars = "".join(rng.choice(kanji) for _ in range(rng.randint(4, 24)))
            chat = [{"role": "user", "content": chars}, {"role": "assistant", "content": chars}]
            prompt = tok.apply_chat_template(chat[:-1], add_generation_prompt=True, tokenize=True, return_dict=False)
            full = tok.apply_chat_template(chat, tokenize=True, return_dict=False)
            rows.append((full, [-100] * len(prompt) + full[len(prompt):]))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([r[0] + [tok.pad_token_id] * (width - len(r[0])) for r in rows])
        labels = torch.tensor([r[1] + [-100] * (width - len(r[1])) for r in rows])
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
    return loss_value


def pretrain(model, stream: tuple[list[int], list[int]], spec: TinySpec, steps: int, label: str) -> float:
    """Causal-LM training on packed blocks; returns the last loss."""
    import torch
    from tqdm import tqdm

    torch.manual_seed(spec.seed)
    usable = len(stream[0]) // spec.block_size * spec.block_size
    data = torch.tensor(stream[0][:usable]).view(-1, spec.block_size)
    labels = torch.tensor(stream[1][:usable]).view(-1, spec.block_size)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(spec.seed)
    model.train()
    loss_value = float("nan")
    bar = tqdm(range(steps), desc=f"pre-training {label}", unit="step", leave=False, disable=None)
    for _ in bar:
        rows = torch.randint(len(data), (spec.batch_size,), generator=gen)
        loss = model(input_ids=data[rows], labels=labels[rows]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return loss_value


def _build(spec: TinySpec, out: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    torch.manual_seed(spec.seed)
    timings, losses = {}, {}
    t0 = time.perf_counter()
    texts, chats = pretraining_corpus(spec)
    tok_dir = out / "tokenizer"
    tok = train_tokenizer(texts, spec, tok_dir)
    stream = token_stream(tok, texts, chats, spec.seed)
    kanji = sorted({c for t in texts for c in t if "\u4e00" <= c <= "\u9fff"})
    timings["corpus_and_tokenizer_s"] = round(time.perf_counter() - t0, 1)
    copier = None
    for name, config_fn, steps in (("dense", _dense_config, spec.dense_steps),
                                   ("moe", _moe_config, spec.moe_steps)):
        t0 = time.perf_counter()
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config_fn(spec, tok), dtype=torch.float32)
        if copier is None:
            losses["copy_warmup"] = round(copy_warmup(model, tok, kanji, spec), 4)
            copier = {k: v.clone() for k, v in model.state_dict().items()}
        else:
            # The MoE shares the dense model's embeddings, attention and norms
            # (same shapes): it inherits the copying heads instead of re-learning them.
            own = model.state_dict()
            model.load_state_dict({k: v for k, v in copier.items() if k in own and own[k].shape == v.shape},
                                  strict=False)
        losses[name] = round(pretrain(model, stream, spec, steps, name), 4)
        model.generation_config = GenerationConfig(
            eos_token_id=[tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")],
            pad_token_id=tok.pad_token_id, do_sample=False)
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
        timings[f"{name}_pretrain_s"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(tok_dir)
    return {"spec": dataclasses.asdict(spec), "tokens_in_corpus": len(stream[0]),
            "final_pretrain_loss": losses, "timings": timings}


def ensure_tiny_models(spec: TinySpec = TinySpec(), root: Path | None = None, quiet: bool = False) -> TinyModels:
    """Paths of the tiny dense and MoE models, building them once if needed."""
    root = root or cache_root()
    final = root / f"tiny-{_cache_key(spec)}"
    result = TinyModels(final / "dense", final / "moe")
    if (final / "build.json").exists():
        return result
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".tiny-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # torchrun ranks or parallel tests build once
        if (final / "build.json").exists():
            return result
        if not quiet:
            print(f"building the tiny models into {final} (once; a few minutes on 2 cores)")
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        try:
            info = _build(spec, tmp)
            (tmp / "build.json").write_text(json.dumps(info, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if not quiet:
            print(f"built in {sum(info['timings'].values()):.0f}s; pre-training loss {info['final_pretrain_loss']}")
    return result


def add_arguments(p) -> None:
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="cache root (default: $QWEN_FINETUNE_CACHE or ~/.cache/qwen-finetune)")
    p.add_argument("--rebuild", action="store_true", help="delete the cached build first")


def run(args) -> int:
    root = args.cache_dir or cache_root()
    if args.rebuild:
        shutil.rmtree(root / f"tiny-{_cache_key(TinySpec())}", ignore_errors=True)
    models = ensure_tiny_models(root=root)
    print(f"dense: {models.dense}\nmoe:   {models.moe}")
    return 0
