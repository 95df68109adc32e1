"""Chat with a slide: PathFLIP visual tokens spliced into a local causal LM's chat prompt (paper eq. 11).

Where the chat gets its tokens, one module per step:

    SlideAnalysis.prepare() -> SlideEncoding: slide_embedding [d], region_embeddings [N, d], region_grid [N, 2]
    visual.py        visual_tensor: the rows of the config's visual layout; cap_visual_tokens: at most
                     max_visual_tokens of them; VisualProjector: rows -> the LLM's width         -> VisualTokens
    prompt.py        tokenize_conversation: the conversation rendered with the tokenizer's own chat template, the
                     <image> placeholder of the first user turn replaced by one position per visual token;
                     splice_visual: the projected tokens put at those positions of the input embeddings
    decoding.py      AnswerStream: prefill, then one token at a time (greedy or sampled)  -> text pieces, ChatAnswer
    conversation.py  Conversation: the history, ask / describe / multiple choice (choice_rule "rank" or "generate")
    grounded.py      GroundedConversation (config.answers "grounded"): presence, where, how many, how large and
                     what-is-here answered from the slide's PathFLIP evidence with citations, descriptions checked
                     against it, the rest by the LLM
    engine.py        ChatEngine: loads and saves a chat folder and runs the steps (encode_visual, stream,
                     score_answers)
    config.py        ChatConfig (chat_config.json) and GenerationSettings

A chat folder (the demo's is sample_data/weights/chat, beside the PathFLIP weights: `WeightsFolder.chat_dir`):

    chat_config.json        ChatConfig: visual dim, image placeholder, token cap and pooling rule, visual layout,
                            prompts, choice rule, history, generation defaults
    projector.safetensors   sigma of the paper: Linear(visual_dim -> LLM hidden), tensors "weight" and "bias"
                            (+ "slots" [10, hidden] for the "areas" visual layout)
    llm/                    a Hugging Face causal-LM folder (config.json, *.safetensors, tokenizer files with a chat
                            template); may instead be given separately (`llm_dir`, the CLI's --llm DIR)
    adapter/                optional peft LoRA folder (adapter_config.json + adapter_model.safetensors)

    engine = ChatEngine.load("sample_data/weights/chat")        # llm_dir=..., device="auto" | "cpu" | "cuda"
    conversation = engine.conversation(analysis.prepare())
    for piece in conversation.stream("Is there necrosis?"):
        print(piece, end="", flush=True)

Visual layout (ChatConfig.visual_layout): "regions" is the paper's [slide; region_1..region_N]; "areas" is [slide;
9 area tokens; regions], an area token being the mean of the region embeddings in one of the nine areas of the tissue
(model.regions.AREA_NAMES: 3 x 3 over the extent of the slide's regions, upper left first; zeros where an area holds
no tissue), and the projector adds a learned slot embedding to each of the first 10 tokens. Why: a pathologist asks
*where* ("upper left", "lower right part"); in the paper's layout that is only the order of a variable number of
region tokens, while a slot of its own for each part of the section is the same for every slide.

Token cap: a slide with more regions than `max_visual_tokens` minus the slide (and area) tokens is reduced to exactly
that many region tokens by `pooling` ("adaptive_avg": adaptive average pooling over the regions in their grid
(row-major) order, so every region still contributes; "top_norm": keep the regions with the largest embedding norm,
in grid order). The slide and area tokens are never pooled. Answers report it (`ChatAnswer.pooled`, `.notice`).

Splice: the text before and after the placeholder is tokenised and kept (the public code dropped the text before
it). Training builds its examples with the same `tokenize_conversation` (training/collate.py), so prompts at training
and inference time are identical token for token; labels are IGNORE_INDEX everywhere except on answer tokens, and
every answer ends with EOS.
"""

from .config import (
    ANSWER_MODES,
    CHOICE_RULES,
    IMAGE_TOKEN,
    POOLING_RULES,
    VISUAL_LAYOUTS,
    ChatConfig,
    GenerationSettings,
)
from .conversation import Conversation, option_shares, ranking_note
from .decoding import AnswerStream, ChatAnswer
from .engine import ADAPTER_DIR, CONFIG_NAME, LLM_DIR, PROJECTOR_NAME, ChatEngine
from .prompt import (
    IGNORE_INDEX,
    TokenizedConversation,
    choice_options,
    format_choice_prompt,
    option_answer,
    splice_visual,
    tokenize_conversation,
)
from .visual import VisualProjector, VisualTokens, area_index, cap_visual_tokens, projector_slots, visual_tensor

# chat.grounded reads the slide's PathFLIP evidence (model/, transformers): imported on first use, so that
# `import napari_pathflip.chat` stays light (the plugin's widgets import it when napari starts)
_GROUNDED = ("Citation", "GroundedConversation", "SlideEvidence", "read_question")


def __getattr__(name: str):
    if name in _GROUNDED:
        from . import grounded

        return getattr(grounded, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ADAPTER_DIR", "ANSWER_MODES", "CHOICE_RULES", "Citation", "GroundedConversation", "SlideEvidence",
           "read_question", "CONFIG_NAME", "IGNORE_INDEX", "IMAGE_TOKEN", "LLM_DIR", "POOLING_RULES",
           "PROJECTOR_NAME", "VISUAL_LAYOUTS", "AnswerStream", "ChatAnswer", "ChatConfig", "ChatEngine",
           "Conversation", "GenerationSettings", "TokenizedConversation", "VisualProjector", "VisualTokens",
           "area_index", "cap_visual_tokens", "choice_options", "format_choice_prompt", "option_answer",
           "option_shares", "projector_slots", "ranking_note", "splice_visual", "tokenize_conversation",
           "visual_tensor"]
