"""The project's assistant masks against transformers' own (`return_assistant_tokens_mask=True`, from the
`{% generation %}` markers of every training template TRL ships), on seeded conversations whose answers start
with `<`, hold unicode and markup-looking text. Every assistant turn's end token is a target.

Where the two legitimately differ, per turn:
- transformers also marks the role header the template prints inside the generation block (`<|start|>assistant`
  for gpt-oss, `<｜Assistant｜>` for DeepSeek, a prefilled `<think>` for Nemotron-3 and Qwen-3.5+): those tokens
  are the generation prompt, which inference feeds the model, so the project does not train them; the test checks
  that the tokens only transformers marks are text of that turn's generation prompt, directly before the turn.
- the project also trains the whitespace a template prints after the end token (Qwen2.5's `<|im_end|>\\n`):
  the test checks that only whitespace directly after transformers' span is extra.
Templates that rewrite history (Nemotron-3 and GLM drop earlier turns' reasoning) are refused by design; the
conversations here hold no reasoning blocks in answers, so nothing is refused.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from lora_causal.core.errors import UserError
from lora_causal.core.recipe import DataSource
from lora_causal.data.tokenizing import RowTokenizer

TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
TRAINING = sorted(path.name.removesuffix("_training.jinja") for path in TEMPLATES.glob("*_training.jinja"))
SPECIAL = re.compile(r"<\|[A-Za-z_0-9]+\|>|<｜[^｜]+｜>|\[/?INST\]|</s>|<start_of_turn>|<end_of_turn>|<end_of_utterance>|"
                     r"<sop>|<start_of_image>|<image>")
BOS = {"gemma": "<bos>", "gemma3": "<bos>", "llama3": "<|begin_of_text|>", "cohere": "<BOS_TOKEN>",
       "cohere2": "<BOS_TOKEN>", "deepseek_r1_distill": "<｜begin▁of▁sentence｜>", "deepseekv3": "<｜begin▁of▁sentence｜>"}
EOS = {"phi3": "<|endoftext|>", "phi3_5": "<|endoftext|>", "llava_next": "</s>"}
NO_SYSTEM = {"gemma"}  # its template raises on a system turn
NO_TEXT = {"idefics3", "smolvlm", "llava_next"}  # multimodal: content must be a list of parts
ANSWERS = ["<b>Paris</b>", "<div class=\"x\">hi</div>", "<?xml version='1.0'?><a/>", "<", "<<>>", "<t", "<html>",
           "<br/>line two", "Ünïcödé ✓ 日本語 🚀", "é", "`code` <tag>", "a < b and c > d", "# Title\n- item\n- <i>x</i>",
           "{\"k\": [1, 2]}", "</answer>", "<｜fake｜> not special", "Hello!", "Fine, thanks.", "  spaced  ", "[link](x)"]
QUESTIONS = ["Hi there!", "<p>Where?</p>", "日本語で?", "<think>user text</think>", "x < y", "What is <b>?"]


def _tokenizer(name: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (TEMPLATES / f"{name}_training.jinja").read_text()
    bos, eos = BOS.get(name, "<s>"), EOS.get(name, "<eos>")
    specials = [token for token in sorted(set(SPECIAL.findall(text))) if token not in (bos, eos)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", bos, eos, *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello there, how are you? assistant user <think> html div class", *ANSWERS], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   additional_special_tokens=specials)
    fast.add_tokens(["<think>", "</think>"])  # added, not special, as in Qwen's and DeepSeek's tokenizers
    fast.chat_template = text
    return fast


def _conversation(rng: random.Random, system: bool) -> list[dict]:
    messages = [{"role": "system", "content": rng.choice(QUESTIONS)}] if system and rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": rng.choice(QUESTIONS)},
                     {"role": "assistant", "content": rng.choice(ANSWERS)}]
    return messages


def _runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for index, value in enumerate([*mask, 0]):
        if value and start is None:
            start = index
        elif not value and start is not None:
            runs.append((start, index))
            start = None
    return runs


@pytest.mark.parametrize("name", [name for name in TRAINING if name not in NO_TEXT])
def test_masks_agree_with_transformers_generation_markers(name: str) -> None:
    tokenizer = _tokenizer(name)
    rows = RowTokenizer(tokenizer, DataSource(path="x.jsonl", format="messages"), "messages", "data.train")
    rng = random.Random(sum(map(ord, name)))
    for _ in range(40):
        messages = _conversation(rng, name not in NO_SYSTEM)
        ids, _, mask = rows("line 1", {"messages": messages})
        reference = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                  return_assistant_tokens_mask=True)
        assert ids == list(reference["input_ids"])
        turns = [t for t, message in enumerate(messages) if message["role"] == "assistant"]
        theirs, ours = _runs(list(reference["assistant_masks"])), _runs(mask)
        assert len(theirs) == len(ours) == len(turns), (messages, theirs, ours)
        for turn, (their_start, their_end), (our_start, our_end) in zip(turns, theirs, ours):
            shown = (name, messages[turn]["content"], tokenizer.decode(ids[their_start:their_end]),
                     tokenizer.decode(ids[our_start:our_end]))
            assert their_start <= our_start < their_end <= our_end, shown  # the end token is ours too
            header = tokenizer.decode(ids[their_start:our_start])
            prompt = tokenizer.apply_chat_template(messages[:turn], tokenize=False, add_generation_prompt=True)
            prompt = prompt.removeprefix(tokenizer.apply_chat_template(messages[:turn], tokenize=False))
            assert header in prompt, shown  # only generation-prompt text, which inference feeds, is left out
            assert not tokenizer.decode(ids[their_end:our_end]).strip(), shown
            assert messages[turn]["content"].strip() in tokenizer.decode(ids[our_start:our_end]), shown


def _spans(tokenizer, messages: list[dict]) -> list[str]:
    rows = RowTokenizer(tokenizer, DataSource(path="x.jsonl", format="messages"), "messages", "data.train")
    ids, _, mask = rows("line 1", {"messages": messages})
    return [tokenizer.decode(ids[start:end]) for start, end in _runs(mask)]


@pytest.mark.parametrize("name", ["deepseek_r1_distill", "deepseekv3", "nemotron_3_nano"])
def test_prefilled_prompt_keeps_an_answer_starting_with_angle_bracket(name: str) -> None:
    tokenizer = _tokenizer(name)
    for answer in ["<b>Paris</b>", "<t", "<", "<think", "<thinking>x"]:
        spans = _spans(tokenizer, [{"role": "user", "content": "Capital?"}, {"role": "assistant", "content": "Ok"},
                                   {"role": "user", "content": "And?"}, {"role": "assistant", "content": answer}])
        assert len(spans) == 2 and answer in spans[1], (answer, spans)


def test_gptoss_trains_every_turn_end_token() -> None:
    spans = _spans(_tokenizer("gptoss"), [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "One."},
                                          {"role": "user", "content": "B?"}, {"role": "assistant", "content": "Two."}])
    assert spans[0].endswith("One.<|end|>") and spans[1].endswith("Two.<|return|>"), spans


@pytest.mark.parametrize("name", ["idefics3", "smolvlm"])
def test_template_that_renders_no_text_is_refused(name: str) -> None:
    with pytest.raises(UserError, match=r"^data.train: the chat template of .* renders none of the text .*"
                                        r"text-only chat_template") as error:
        RowTokenizer(_tokenizer(name), DataSource(path="x.jsonl", format="messages"), "messages", "data.train")
    assert "\n" not in str(error.value)
