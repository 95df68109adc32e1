"""Training speed of both stages at the paper's scale, with random weights and random features (no downloads).

alignment   PathFLIP with the paper's sizes (PathFLIPConfig.paper(): BERT-base-shaped Q-Former/text encoder, randomly
            initialised, MiniLM's tokenizer for the text side), B = 8 slides x 24 regions x 256 patches x 512-d,
            K = 8 subcaptions: forward (both losses) + backward + AdamW step.
instruct    a Qwen3-0.6B-shaped LLM (training.tiny_llm.qwen3_0_6b_config, random weights) + LoRA r 16 on
            q/k/v/o/gate/up/down_proj + projector, B = 8 conversations of 1 + 24 visual tokens, a 48-token prompt and
            a 160-token answer (the stage caches the frozen PathFLIP encoding, so a step is the LLM only; the one-off
            encoding cost per slide is printed separately).
bf16 autocast on CUDA. Prints steps/s, peak memory (CUDA: max allocated per stage; CPU: process peak RSS so far)
and the implied epoch time for 4,915 slides (alignment: 4,915 / 8 steps; instruct: 4,915 conversations).

    python benchmarks/bench_train.py            # paper shapes (meant for a GPU)
    python benchmarks/bench_train.py --small    # tiny shapes, proves the script runs on a CPU
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_pathflip.chat import splice_visual  # noqa: E402
from training.collate import build_training_example, collate_training_examples  # noqa: E402
from napari_pathflip.model import PathFLIP, PathFLIPConfig, SlideInput  # noqa: E402
from napari_pathflip.model import default_bert_dir  # noqa: E402
from training.tiny_llm import qwen3_0_6b_config  # noqa: E402

EPOCH_SLIDES = 4915
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = ("tumour stroma necrosis lymphocytes glands fat nest invasive carcinoma margin grade nuclei mitoses "
         "fibrous dense central upper lower left right part section present shows").split()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def sentence(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, words)).capitalize() + "."


def slide(rng: np.random.Generator, regions: int, side: int, dim: int) -> SlideInput:
    """Random features on a fully packed grid: `regions` regions in a row, each side x side patches."""
    ys, xs = np.mgrid[0:side, 0:regions * side]
    coords = np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64) * 256
    return SlideInput(torch.from_numpy(rng.standard_normal((len(coords), dim), np.float32)), coords, 256)


def timed_steps(step, warmup: int, steps: int, device: torch.device) -> float:
    """Steps per second over `steps` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - start)


def bench_alignment(args, device: torch.device) -> None:
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    if args.small:
        config = PathFLIPConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, patch_dim=64,
                                vision_width=32, embed_dim=32, mixer_heads=4, mixer_ffn=64, text_region_heads=4,
                                region_patches=4, max_regions=4)
        batch, regions, side, k = 2, 4, 4, 8
    else:
        config = PathFLIPConfig.paper()
        batch, regions, side, k = args.batch, 24, 16, 8
    tokenizer = AutoTokenizer.from_pretrained(str(default_bert_dir()), local_files_only=True)
    model = PathFLIP(config, tokenizer).to(device).train()
    slides = [slide(rng, regions, side, config.patch_dim) for _ in range(batch)]
    captions = [" ".join(sentence(rng, 12) for _ in range(8)) for _ in range(batch)]
    subcaptions = [[sentence(rng, 12) for _ in range(k)] for _ in range(batch)]
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    generator = torch.Generator().manual_seed(0)
    autocast = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(slides, captions, subcaptions, generator)["total"]
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    reset_peak(device)
    rate = timed_steps(step, args.warmup, args.steps, device)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    epoch_s = EPOCH_SLIDES / batch / rate
    print(f"alignment  {params:7.1f} M params  B={batch} x {regions} regions x {side * side} patches x "
          f"{config.patch_dim}-d, K={k}:  {rate:.3f} steps/s  ({rate * batch:.1f} slides/s)  peak "
          f"{peak_mib(device):,.0f} MiB  -> epoch of {EPOCH_SLIDES:,} slides {epoch_s / 60:.1f} min "
          f"(goal <= 3 min on one H100)")

    model.eval()
    one = slides[0]
    sync(device)
    start = time.perf_counter()
    model.encode_slide(one.features, one.coords, one.patch_size_level0, torch.bfloat16, keep_features=False)
    sync(device)
    seconds = time.perf_counter() - start
    print(f"encode     one slide of {regions} regions (the instruct stage does this once per slide, cached): "
          f"{seconds * 1000:.0f} ms -> {EPOCH_SLIDES:,} slides {seconds * EPOCH_SLIDES / 60:.1f} min once")
    del model, optimiser


def bench_instruct(args, device: torch.device) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3ForCausalLM

    from training.tiny_llm import TinyLLMConfig, qwen3_config, train_tokenizer

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # a small corpus tokenizer with the ChatML template; the model's vocabulary is Qwen3's size (151,936)
    tokenizer = train_tokenizer([sentence(rng, 20) for _ in range(200)], vocab_size=512)
    if args.small:
        config = qwen3_config(TinyLLMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=32, intermediate_size=256), tokenizer)
        batch, regions, prompt_words, answer_words = 2, 4, 8, 24
    else:
        config = qwen3_0_6b_config()
        batch, regions, prompt_words, answer_words = args.batch, 24, 48, 160
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    llm = Qwen3ForCausalLM(config).to(device, dtype)
    llm = get_peft_model(llm, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=LORA_TARGETS))
    projector = torch.nn.Linear(256, config.hidden_size).to(device)
    visual_len = 1 + regions

    def words(n: int) -> str:  # one vocabulary word per token keeps the lengths exact enough
        return " ".join(rng.choice(WORDS, n))

    examples = [build_training_example(tokenizer, visual_len, [{"role": "user", "content": words(prompt_words)},
                                                               {"role": "assistant", "content": words(answer_words)}])
                for _ in range(batch)]
    batch_tensors = collate_training_examples(examples, tokenizer.pad_token_id)
    visual = [torch.randn(visual_len, 256, device=device) for _ in range(batch)]
    params = [p for p in llm.parameters() if p.requires_grad] + list(projector.parameters())
    optimiser = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)
    autocast = device.type == "cuda"
    ids = batch_tensors["input_ids"].to(device)
    mask, labels = batch_tensors["attention_mask"].to(device), batch_tensors["labels"].to(device)
    llm.train()

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            embeds = splice_visual(llm.get_input_embeddings()(ids), [projector(v) for v in visual],
                                   batch_tensors["image_starts"])
            loss = llm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    reset_peak(device)
    rate = timed_steps(step, args.warmup, args.steps, device)
    total = sum(p.numel() for p in llm.parameters()) / 1e6
    trainable = sum(p.numel() for p in params) / 1e6
    epoch_s = EPOCH_SLIDES / batch / rate
    print(f"instruct   {total:7.1f} M params ({trainable:.1f} M trainable: LoRA + projector)  B={batch} x "
          f"{ids.shape[1]} tokens ({visual_len} visual):  {rate:.3f} steps/s  ({rate * batch:.1f} conversations/s)  "
          f"peak {peak_mib(device):,.0f} MiB  -> epoch of {EPOCH_SLIDES:,} conversations {epoch_s / 60:.1f} min")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--stage", choices=["alignment", "instruct", "both"], default="both")
    parser.add_argument("--batch", type=int, default=8, help="slides (alignment) / conversations (instruct) per step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20, --small 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3, --small 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.steps = args.steps or (3 if args.small else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.small else 3)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; torch {torch.__version__}; {'small' if args.small else 'paper'} shapes; "
          f"{args.steps} timed steps after {args.warmup} warm-up")
    if args.stage in ("alignment", "both"):
        bench_alignment(args, device)
    if args.stage in ("instruct", "both"):
        bench_instruct(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
