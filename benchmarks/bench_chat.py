"""Chat speed: time to first token and decode tokens/s.

CUDA (when available): a Qwen3-0.6B-shaped model with random weights in bf16 and ~800 visual tokens, side by side:
  generate        Hugging Face `generate(inputs_embeds=...)`, dynamic cache (the baseline)
  engine-plain    the chat engine's decode loop with a dynamic cache
  engine-fast     the chat engine's fast path: static KV cache + torch.compile(mode="reduce-overhead") decode step
Goals (issue 6): >= 300 tokens/s decode and <= 100 ms to first token on an H100.
CPU: the tiny demo-shaped model (training.tiny_llm defaults): first-token latency, goal <= 300 ms.
Both: "ranked choice", the time from a 4-option multiple-choice request to its first piece under choice_rule
"rank" (the options scored in one batched pass, then the prefill of the prompt with the chosen option's answer).
Grounded (with the shipped demo weights and chat): the demo slide analysed and cached, side by side in one run, the
same questions answered by the paper's visual-token chat ("visual") and from the slide's evidence ("grounded"):
first piece of each answer (every question a wording not asked before, so its text is grounded anew; p50/p95), and
descriptions (the LLM writes, the grounded path checks each sentence against the evidence, so a sentence shows when
it is complete) as the LLM's tokens per second from the request to the last piece shown. The two paths alternate. Goals (issue 23): grounded first piece p95 <= 150 ms, description
streaming within 10 % of the visual chat's.

    python benchmarks/bench_chat.py [--visual-tokens 800] [--new-tokens 128] [--repeats 3] [--cpu-only]
                                    [--grounded-only]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_pathflip.chat import ChatConfig, ChatEngine, GenerationSettings  # noqa: E402
from training.tiny_llm import TinyLLMConfig, build_tiny_llm, qwen3_0_6b_config, train_tokenizer  # noqa: E402

CAPTIONS = ROOT.parent / "shared" / "data" / "slidebench" / "SlideBench-Caption-TCGA.csv"
QUESTION = [{"role": "user", "content": "What is the diagnosis, and is there lymphovascular invasion?"}]


def texts() -> list[str]:
    if CAPTIONS.is_file():
        with open(CAPTIONS, encoding="utf-8-sig", newline="") as f:
            return [row["Caption"] for row in csv.DictReader(f)]
    return ["Invasive ductal carcinoma of the breast with lymphovascular invasion and free margins."] * 50


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_engine(engine: ChatEngine, visual: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Median (first-token seconds, decode tokens/s) over `repeats` answers of exactly `new_tokens` tokens."""
    settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    first, rate = [], []
    for _ in range(repeats):
        answer = engine.generate(visual, QUESTION, settings)
        first.append(answer.first_token_s)
        rate.append(answer.decode_tokens_per_s or float("nan"))
    return statistics.median(first), statistics.median(rate)


OPTIONS = {"A": "Invasive ductal carcinoma", "B": "Invasive lobular carcinoma", "C": "Ductal carcinoma in situ",
           "D": "Fibroadenoma"}


def bench_choice(engine: ChatEngine, visual: torch.Tensor, repeats: int) -> float:
    """Median seconds from a ranked multiple-choice request to its first streamed piece."""
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        stream = engine.conversation(visual).stream_choice("What is the diagnosis?", OPTIONS, rule="rank")
        next(stream)
        sync(engine.device)
        times.append(time.perf_counter() - start)
        stream.cancel()
        stream.result()
    return statistics.median(times[1:])


def bench_generate(engine: ChatEngine, visual: torch.Tensor, new_tokens: int, repeats: int,
                   **generate_kwargs) -> tuple[float, float]:
    """Hugging Face generate on the same spliced inputs_embeds: first token = a 1-token generate."""
    from napari_pathflip.chat import splice_visual, tokenize_conversation

    tokens = engine.encode_visual(visual)
    prompt = tokenize_conversation(engine.tokenizer, len(tokens), QUESTION, engine.config, add_generation_prompt=True)
    with torch.inference_mode():
        embeds = splice_visual(engine.embed_tokens(prompt.input_ids.to(engine.device)[None]), [tokens.embeds],
                               [prompt.image_start])
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=engine.device)

    def run(n: int) -> float:
        sync(engine.device)
        start = time.perf_counter()
        with torch.inference_mode():
            engine.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=engine.tokenizer.pad_token_id, **generate_kwargs)
        sync(engine.device)
        return time.perf_counter() - start

    run(new_tokens)  # warm-up (and compilation, when asked for)
    first = [run(1) for _ in range(repeats)]
    full = [run(new_tokens) for _ in range(repeats)]
    first_s, full_s = statistics.median(first), statistics.median(full)
    return first_s, (new_tokens - 1) / max(full_s - first_s, 1e-9)


def row(name: str, first_s: float, rate: float) -> None:
    print(f"  {name:<22} first token {first_s * 1000:8.1f} ms   decode {rate:8.1f} tokens/s", flush=True)


def cpu_part(args) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer = build_tiny_llm(texts(), TinyLLMConfig())
    config = ChatConfig()
    engine = ChatEngine(model, tokenizer, config, fast=False)
    print(f"CPU, tiny demo-shaped Qwen3 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters), "
          f"{torch.get_num_threads()} threads, {args.new_tokens} new tokens:")
    for visual_tokens in (65, args.visual_tokens):
        visual = torch.randn(visual_tokens, config.visual_dim)
        bench_engine(engine, visual, 4, 1)  # warm-up
        first_s, rate = bench_engine(engine, visual, args.new_tokens, args.repeats)
        row(f"engine, {visual_tokens} visual", first_s, rate)
        print(f"  {'ranked choice':<22} first piece {bench_choice(engine, visual, args.repeats) * 1000:8.1f} ms",
              flush=True)
    print("  goal: first token <= 300 ms")


def cuda_part(args) -> None:
    device = torch.device("cuda")
    tokenizer = train_tokenizer(texts(), 4096)
    torch.manual_seed(0)
    from transformers import Qwen3ForCausalLM

    llm = Qwen3ForCausalLM(qwen3_0_6b_config()).to(device, torch.bfloat16).eval()
    config = ChatConfig(context_tokens=args.visual_tokens + 512)
    plain = ChatEngine(llm, tokenizer, config, fast=False)
    fast = ChatEngine(llm, tokenizer, config, plain.projector, fast=True)
    visual = torch.randn(args.visual_tokens, config.visual_dim)
    print(f"CUDA {torch.cuda.get_device_name()}, Qwen3-0.6B-shaped random weights, bf16, "
          f"{args.visual_tokens} visual tokens, {args.new_tokens} new tokens:")
    row("generate (dynamic)", *bench_generate(plain, visual, args.new_tokens, args.repeats))
    bench_engine(plain, visual, 4, 1)
    row("engine-plain", *bench_engine(plain, visual, args.new_tokens, args.repeats))
    start = time.perf_counter()
    fast.warmup(visual_len=args.visual_tokens)
    print(f"  (fast path compile + CUDA graph capture: {time.perf_counter() - start:.1f} s)")
    row("engine-fast", *bench_engine(fast, visual, args.new_tokens, args.repeats))
    print(f"  {'ranked choice, fast':<22} first piece {bench_choice(fast, visual, args.repeats) * 1000:8.1f} ms")
    print("  goals: decode >= 300 tokens/s, first token <= 100 ms")


GROUNDED_QUESTIONS = [f"{ask.format(w=w)}" for ask, words in (
    ("Is there {w}?", ("necrosis", "dead tissue", "calcification", "immune cells", "a granuloma")),
    ("Where is the {w}?", ("fat", "adipose tissue", "tumour nest", "benign glands", "lymphocytic infiltrate")),
    ("How many {w} are there?", ("tumour nests", "nests of carcinoma", "gland groups")),
    ("How large is the {w}?", ("necrosis", "tumour", "area of fat")),
    ("Are there any {w} on this slide?", ("mitotic figures", "lymphocytes", "normal glands", "fat cells")))
    for w in words]


def grounded_part(args) -> None:
    from napari_pathflip.analysis import SlideAnalysis
    from napari_pathflip.viewer.sample_data import DEMO_SLIDE, sample_data_dir
    from napari_pathflip.weights import WeightsFolder

    torch.set_num_threads(args.threads)
    weights = WeightsFolder.resolve()
    if not (weights.chat_dir / "chat_config.json").is_file():
        print("grounded part skipped: no shipped demo chat (python -m training demo)")
        return
    analysis = SlideAnalysis(sample_data_dir() / DEMO_SLIDE, weights, device="cpu")
    analysis.prepare()  # analysed and cached, as when the dock answers
    engine = ChatEngine.load(weights.chat_dir, device="cpu", merge=True)
    print(f"Grounded chat, demo slide and demo chat, CPU {torch.get_num_threads()} threads "
          f"({len(GROUNDED_QUESTIONS)} questions, each new to the slide's evidence):")

    def first_piece(mode: str, question: str) -> float:
        engine.config.answers = mode
        conversation = engine.conversation(analysis.prepare(), analysis)
        start = time.perf_counter()
        stream = conversation.stream(question, GenerationSettings(max_new_tokens=48))
        next(stream)
        first = time.perf_counter() - start
        stream.result()
        return first

    def describe(mode: str) -> tuple[float, float, int]:
        """(first piece s, tokens per second from the request to the last piece, LLM tokens)."""
        engine.config.answers = mode
        conversation = engine.conversation(analysis.prepare(), analysis)
        start = time.perf_counter()
        settings = GenerationSettings(max_new_tokens=args.new_tokens)
        stream = conversation.stream(engine.config.caption_prompt, settings)
        times = [time.perf_counter() for _ in stream]
        tokens = len(stream.answer.token_ids)
        return times[0] - start, tokens / (times[-1] - start), tokens

    for mode in ("grounded", "visual"):  # warm-up: imports, the first groundings, the first prefill
        first_piece(mode, "Is there stroma?")
        describe(mode)  # the grounded path grounds the report's findings once per slide
    # side by side: the two paths alternate, so load on the machine falls on both alike; each question is a wording
    # not asked before (the grounded path finds nothing cached for it)
    times = {"visual": [], "grounded": []}
    for question in GROUNDED_QUESTIONS:
        times["visual"].append(first_piece("visual", question.replace("?", " on the slide?")))
        times["grounded"].append(first_piece("grounded", question))
    for mode, values in times.items():
        values = sorted(values)
        p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
        print(f"  {mode:<9} questions    first piece p50 {statistics.median(values) * 1000:7.1f} ms   "
              f"p95 {p95 * 1000:7.1f} ms", flush=True)
    runs = {"visual": [], "grounded": []}
    for _ in range(args.repeats):
        for mode in runs:
            runs[mode].append(describe(mode))
    for mode, values in runs.items():
        first_s = statistics.median(v[0] for v in values)
        rate = statistics.median(v[1] for v in values)
        print(f"  {mode:<9} description  first piece {first_s * 1000:7.1f} ms   {rate:6.1f} tokens/s from the "
              f"request to the last piece ({values[0][2]} LLM tokens)", flush=True)
    ratio = statistics.median(v[1] for v in runs["grounded"]) / statistics.median(v[1] for v in runs["visual"])
    print(f"  grounded / visual description rate: {ratio:.2f}")
    engine.config.answers = "grounded"
    print("  goals: grounded first piece p95 <= 150 ms; description rate within 10 % of the visual chat's (>= 0.90)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visual-tokens", type=int, default=800)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the CPU part")
    parser.add_argument("--cpu-only", action="store_true")
    parser.add_argument("--grounded-only", action="store_true", help="only the grounded-chat comparison")
    args = parser.parse_args(argv)
    if not args.grounded_only:
        if torch.cuda.is_available() and not args.cpu_only:
            cuda_part(args)
        cpu_part(args)
    grounded_part(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
