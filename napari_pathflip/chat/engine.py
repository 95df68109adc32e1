"""ChatEngine: projector + causal LM (+ LoRA) + tokenizer + ChatConfig, loaded from and saved to a chat folder;
it turns a slide's visual tokens and a conversation into answers (streamed) and scores given answers."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from ..errors import PathflipError
from ..weights import check_finite, resolve_device, verify_manifest, write_manifest
from .config import ChatConfig, GenerationSettings
from .conversation import Conversation
from .decoding import AnswerStream, ChatAnswer, PlainDecoder, StaticDecoder
from .prompt import TokenizedConversation, splice_visual, tokenize_conversation
from .visual import VisualProjector, VisualTokens, cap_visual_tokens, projector_slots, visual_tensor

# the chat folder (package docstring)
CONFIG_NAME = "chat_config.json"
PROJECTOR_NAME = "projector.safetensors"
LLM_DIR = "llm"
ADAPTER_DIR = "adapter"


def _check_llm_dir(llm_dir: Path) -> None:
    what = (f"{llm_dir} must be a Hugging Face causal-LM folder: config.json, model.safetensors (or a sharded "
            "model.safetensors.index.json), tokenizer.json/tokenizer_config.json with a chat template")
    if not llm_dir.is_dir():
        raise PathflipError(f"LLM folder not found. {what}; give it with --llm DIR or put it in the chat folder "
                            "as llm/")
    if not (llm_dir / "config.json").is_file():
        raise PathflipError(f"config.json missing. {what}")
    if not any(llm_dir.glob("*.safetensors")):
        pickles = [p.name for p in llm_dir.glob("*.bin")]
        hint = (f" (found pickle weights {pickles}: convert them to safetensors; pickles are never loaded)"
                if pickles else "")
        raise PathflipError(f"no .safetensors weights{hint}. {what}")
    if not ((llm_dir / "tokenizer.json").is_file() or (llm_dir / "tokenizer_config.json").is_file()):
        raise PathflipError(f"tokenizer files missing. {what}")


class ChatEngine:
    """Projector + causal LM + tokenizer + ChatConfig: turns a slide's visual tokens and a conversation into answers.

    `fast=None` picks the fast path (static cache + compiled decode step) on CUDA and the plain path elsewhere;
    `fast=True` on CPU runs the static-cache loop without compiling. One answer is generated at a time per engine
    (`answer_lock`).
    """

    def __init__(self, llm, tokenizer, config: ChatConfig | None = None, projector: VisualProjector | None = None,
                 fast: bool | None = None):
        self.config = config or ChatConfig()
        self.llm = llm.eval()
        self.tokenizer = tokenizer
        hidden = llm.get_input_embeddings().embedding_dim
        param = next(llm.parameters())
        self.device, self.dtype = param.device, param.dtype
        if projector is None:
            projector = VisualProjector(self.config.visual_dim, hidden, projector_slots(self.config))
        slots = 0 if getattr(projector, "slots", None) is None else len(projector.slots)
        if slots != projector_slots(self.config):
            raise PathflipError(f"the projector has {slots} slot embeddings but the visual layout "
                                f"{self.config.visual_layout!r} needs {projector_slots(self.config)}: "
                                "projector.safetensors and chat_config.json belong to different chat models")
        if (projector.in_features, projector.out_features) != (self.config.visual_dim, hidden):
            raise PathflipError(
                f"the projector maps {projector.in_features} -> {projector.out_features} but the visual dim is "
                f"{self.config.visual_dim} and the LLM's hidden size {hidden}: the projector belongs to another "
                "PathFLIP model or LLM; use the matching chat folder or --llm")
        self.projector = projector.to(self.device, self.dtype).eval()
        self.fast = self.device.type == "cuda" if fast is None else bool(fast)
        self.context_tokens = min(self.config.context_tokens,
                                  getattr(llm.config, "max_position_embeddings", None) or self.config.context_tokens)
        eos = {tokenizer.eos_token_id}
        generation_eos = getattr(getattr(llm, "generation_config", None), "eos_token_id", None)
        eos.update(generation_eos if isinstance(generation_eos, list) else [generation_eos])
        self.eos_ids = sorted(i for i in eos if i is not None)
        self.answer_lock = threading.Lock()  # held while an answer is generated or answers are scored
        self._static: StaticDecoder | None = None

    # -------------------------------------------------------------------------------------------- folders
    @classmethod
    def load(cls, folder: str | Path, *, llm_dir: str | Path | None = None, device: str | None = None,
             dtype: torch.dtype | None = None, merge: bool = False, fast: bool | None = None) -> ChatEngine:
        """Load a chat model folder (see the package docstring); `llm_dir` overrides folder/llm; `device` is a name
        for `weights.resolve_device` (None: "auto"); `merge` folds the LoRA adapter into the weights (faster
        inference, same answers)."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        layout = (f"a chat model folder holds {CONFIG_NAME}, {PROJECTOR_NAME}, {LLM_DIR}/ (a Hugging Face causal-LM "
                  f"folder, or give it with --llm DIR) and optionally {ADAPTER_DIR}/ (a peft LoRA folder)")
        if not folder.is_dir():
            raise PathflipError(f"chat model folder {folder} not found: {layout}")
        for name in (CONFIG_NAME, PROJECTOR_NAME):
            if not (folder / name).is_file():
                raise PathflipError(f"{folder} has no {name}: {layout}")
        verify_manifest(folder)  # damaged files are named before anything loads from them
        config = ChatConfig.load(folder / CONFIG_NAME)
        llm_dir = Path(llm_dir) if llm_dir is not None else folder / LLM_DIR
        if llm_dir != folder / LLM_DIR:
            verify_manifest(llm_dir)
        _check_llm_dir(llm_dir)
        device = resolve_device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # a mismatch is reported below in one line, not as transformers' table
        try:
            tokenizer = AutoTokenizer.from_pretrained(llm_dir, local_files_only=True, trust_remote_code=False)
            llm = AutoModelForCausalLM.from_pretrained(llm_dir, local_files_only=True, trust_remote_code=False,
                                                       use_safetensors=True, dtype=dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:  # RuntimeError: shapes unlike its config
            raise PathflipError(f"cannot load the LLM from {llm_dir} ({type(exc).__name__}: {exc}); check that its "
                                "config.json and weights belong together, or restore the folder.") from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        check_finite(llm.state_dict(), llm_dir)
        adapter = folder / ADAPTER_DIR
        if adapter.is_dir():
            from peft import PeftModel

            if not (adapter / "adapter_config.json").is_file() or not (adapter / "adapter_model.safetensors").is_file():
                raise PathflipError(f"{adapter} must hold adapter_config.json and adapter_model.safetensors "
                                    "(a peft LoRA folder saved with save_pretrained); remove it to run without LoRA")
            llm = PeftModel.from_pretrained(llm, adapter, is_trainable=False)
            if merge:
                llm = llm.merge_and_unload()
        try:
            state = load_file(folder / PROJECTOR_NAME)
        except Exception as exc:  # safetensors raises its own error type for a truncated or garbled file
            raise PathflipError(f"{folder / PROJECTOR_NAME} cannot be read ({exc}): the file is damaged; restore "
                                "the chat folder or train it again.") from exc
        check_finite(state, folder / PROJECTOR_NAME)
        if not {"weight", "bias"} <= set(state) <= {"weight", "bias", "slots"}:
            raise PathflipError(f"{folder / PROJECTOR_NAME} must hold the tensors 'weight' and 'bias' (and 'slots' "
                                "for the \"areas\" visual layout)")
        projector = VisualProjector(state["weight"].shape[1], state["weight"].shape[0],
                                    len(state["slots"]) if "slots" in state else 0)
        projector.load_state_dict(state)
        return cls(llm.to(device), tokenizer, config, projector, fast=fast)

    def save(self, folder: str | Path, include_llm: bool = True, dtype: torch.dtype | None = None) -> Path:
        """Write the chat model folder. A peft-wrapped LLM is saved as base weights in llm/ plus adapter/. `dtype`
        (e.g. torch.float16) stores the LLM's and the adapter's floating-point weights in that type (half the bytes;
        loading casts them to the engine's dtype); the projector stays float32."""
        from safetensors.torch import load_file, save_file

        cast = (lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.config.save(folder / CONFIG_NAME)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.projector.state_dict().items()},
                  folder / PROJECTOR_NAME)
        base = self.llm
        if hasattr(self.llm, "peft_config"):
            self.llm.save_pretrained(folder / ADAPTER_DIR)
            # peft writes target_modules in set order (it changes with PYTHONHASHSEED): sort it, so a rerun writes
            # the same bytes
            config = folder / ADAPTER_DIR / "adapter_config.json"
            data = json.loads(config.read_text())
            if isinstance(data.get("target_modules"), list):
                data["target_modules"] = sorted(data["target_modules"])
                config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
            if dtype is not None:
                adapter = folder / ADAPTER_DIR / "adapter_model.safetensors"
                save_file({k: cast(v).contiguous() for k, v in load_file(adapter).items()}, adapter)
            base = self.llm.get_base_model()
        # the base model may still carry the LoRA wrappers: save the original weights under their original names
        base_state = {k.replace(".base_layer.", "."): cast(v.detach()) for k, v in base.state_dict().items()
                      if "lora_" not in k}
        if include_llm:
            base.save_pretrained(folder / LLM_DIR, state_dict=base_state)
            self.tokenizer.save_pretrained(folder / LLM_DIR)
        write_manifest(folder)
        return folder

    # ------------------------------------------------------------------------------------------ building
    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(input_ids)

    def encode_visual(self, visual) -> VisualTokens:
        """Validate, cap (config.max_visual_tokens, config.pooling) and project a slide's visual rows."""
        if isinstance(visual, VisualTokens):
            return visual
        rows = visual_tensor(visual, self.config.visual_layout)
        if rows.shape[1] != self.config.visual_dim:
            raise PathflipError(f"the slide embeddings are {rows.shape[1]}-d but this chat model expects "
                                f"{self.config.visual_dim}-d: use the chat weights trained with this PathFLIP model")
        leading = self.config.leading_tokens
        capped, pooled = cap_visual_tokens(rows, self.config.max_visual_tokens, self.config.pooling, leading)
        notice = None
        if pooled:
            notice = (f"This slide has {rows.shape[0] - leading:,} regions; they were pooled to "
                      f"{capped.shape[0] - leading:,} region tokens ({self.config.pooling}) to fit the chat model.")
        with torch.no_grad():
            embeds = self.projector(capped.to(self.device, self.dtype))
        return VisualTokens(embeds, rows.shape[0] - leading, pooled, notice)

    def decoder(self) -> PlainDecoder | StaticDecoder:
        """The decoder of the next answer: a fresh plain one, or the engine's one static-cache decoder (fast)."""
        if not self.fast:
            return PlainDecoder(self.llm)
        if self._static is None:
            self._static = StaticDecoder(self.llm, self.context_tokens, compile=self.device.type == "cuda")
        return self._static

    # ---------------------------------------------------------------------------------------- answering
    def _prompt(self, visual, turns: Sequence[Mapping]) -> tuple[VisualTokens, TokenizedConversation]:
        """(visual tokens, generation prompt) for answering the last (user) turn of `turns`."""
        if not turns or str(turns[-1].get("role", turns[-1].get("from", ""))).lower() not in ("user", "human"):
            raise PathflipError("the conversation must end with a user turn to answer")
        last = turns[-1].get("content", turns[-1].get("value", ""))
        if not isinstance(last, str) or not last.strip():
            raise PathflipError("the question is empty: type a question about the slide")
        visual = self.encode_visual(visual)
        prompt = tokenize_conversation(self.tokenizer, len(visual), turns, self.config, add_generation_prompt=True)
        if len(prompt) >= self.context_tokens:
            raise PathflipError(
                f"the input needs {len(prompt):,} tokens ({len(visual):,} visual + {len(prompt) - len(visual):,} "
                f"text) but the chat model's context holds {self.context_tokens:,}: shorten the question, start a "
                f"new conversation, or lower max_visual_tokens in {CONFIG_NAME}")
        return visual, prompt

    def stream(self, visual, turns: Sequence[Mapping], settings: GenerationSettings | None = None,
               cancel: threading.Event | None = None, on_done: Callable[[ChatAnswer], None] | None = None,
               prefix: str = "", option_scores: dict[str, float] | None = None) -> AnswerStream:
        """Answer the last (user) turn of `turns` about `visual`; iterate the result for text pieces. `prefix`: the
        answer's forced start (counted in max_new_tokens), e.g. a ranked choice's "B. Necrosis."."""
        settings = settings or self.config.generation
        visual, prompt = self._prompt(visual, turns)
        room = self.context_tokens - len(prompt)
        notice = visual.notice
        max_new = settings.max_new_tokens
        if room < max_new:
            max_new = room
            notice = " ".join(filter(None, [notice, f"Only {room} tokens of context are left for the answer."]))
        prefix_ids = self.tokenizer.encode(prefix, add_special_tokens=False) if prefix else []
        return AnswerStream(self, prompt, visual, settings, max_new, notice, cancel, on_done, prefix_ids,
                            option_scores)

    def score_answers(self, visual, turns: Sequence[Mapping], answers: Sequence[str]) -> list[float]:
        """Summed log-probability of each of `answers` (its tokens, then EOS) as the reply to the last user turn of
        `turns`, after the prompt exactly as `stream` builds it. The prompt is run once; its KV cache is repeated
        for the answers, which run as one right-padded batch (causal attention needs no mask for end padding)."""
        visual, prompt = self._prompt(visual, turns)
        eos = self.tokenizer.eos_token_id  # the EOS every trained answer ends with (tokenize_conversation)
        tails = [self.tokenizer.encode(a.strip(), add_special_tokens=False) + [eos] for a in answers]
        if not answers or min(map(len, tails)) < 2:
            raise PathflipError("give at least one non-empty answer to score")
        longest = max(map(len, tails))
        if len(prompt) + longest > self.context_tokens:
            raise PathflipError(f"the question and its longest option need {len(prompt) + longest:,} tokens but the "
                                f"chat model's context holds {self.context_tokens:,}: shorten the options or start a "
                                "new conversation")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        ids = torch.full((len(tails), longest), pad, dtype=torch.long)
        for row, tail in enumerate(tails):
            ids[row, :len(tail)] = torch.tensor(tail)
        if not self.answer_lock.acquire(blocking=False):
            raise PathflipError("another answer is still being generated: cancel it or wait for it to finish")
        try:
            with torch.no_grad():
                embeds = splice_visual(self.embed_tokens(prompt.input_ids.to(self.device)[None]), [visual.embeds],
                                       [prompt.image_start])
                decoder = PlainDecoder(self.llm)
                first = decoder.prefill(embeds)[:, None]  # predicts each answer's first token
                decoder.cache.batch_repeat_interleave(len(tails))
                rest = self.llm(input_ids=ids[:, :-1].to(self.device), past_key_values=decoder.cache,
                                use_cache=True).logits
                logits = torch.cat([first.expand(len(tails), -1, -1), rest], 1).float()
        finally:
            self.answer_lock.release()
        logp = logits.log_softmax(-1).cpu()
        return [float(logp[row, torch.arange(len(tail)), torch.tensor(tail)].sum()) for row, tail in enumerate(tails)]

    def generate(self, visual, turns: Sequence[Mapping], settings: GenerationSettings | None = None,
                 cancel: threading.Event | None = None) -> ChatAnswer:
        return self.stream(visual, turns, settings, cancel).result()

    def conversation(self, visual, source=None) -> Conversation:
        """A conversation about a slide: `visual` its encoding (or visual rows); `source` its SlideAnalysis (or
        report.EncodedSlide) for grounded answers (config.answers "grounded"; without a source the answers are
        the LLM's)."""
        if source is not None and self.config.answers == "grounded":
            from .grounded import GroundedConversation

            return GroundedConversation(self, visual, source)
        return Conversation(self, visual)

    def warmup(self, visual_len: int = 64, new_tokens: int = 8) -> None:
        """Run one short answer so the fast path compiles and captures its CUDA graph before the user asks."""
        visual = torch.zeros(visual_len, self.config.visual_dim)
        settings = GenerationSettings(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        self.generate(visual, [{"role": "user", "content": "warm up"}], settings)
