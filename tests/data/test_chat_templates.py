"""Assistant-only masking with the real chat templates TRL ships (read offline from its package), on tokenizers
built here with each template's special tokens: exactly the assistant turns and their end-of-turn tokens are
targets; templates that rewrite earlier turns are refused with the turn and both renderings."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_causal.core.errors import UserError
from lora_causal.core.recipe import DataSource
from lora_causal.data.tokenizing import RowTokenizer

TEMPLATES = Path(__import__("trl").__file__).parent / "chat_templates"
LLAMA3 = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
QWEN = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"]
PHI3 = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"]
# Mistral-7B-Instruct's template (TRL does not ship it): [INST] turns, assistant answers closed by EOS.
MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
           "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")
# template -> (special tokens, bos, eos, what each assistant turn's targets end with)
CASES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "llama3_1": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "llama3_2": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>"),
    "qwen2_5": (QWEN, None, "<|im_end|>", "<|im_end|>\n"),
    "qwen3_training": (QWEN, None, "<|im_end|>", "<|im_end|>\n"),
    "gemma3": (["<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"], "<bos>", "<eos>", "<end_of_turn>\n"),
    "phi3": (PHI3, None, "<|endoftext|>", "<|end|>\n"),
    "phi3_5": (PHI3, None, "<|endoftext|>", "<|end|>\n"),
    "deepseek_r1_distill": (["<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>", "<think>",
                             "</think>"], "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", "</s>"),
}
SYSTEM = {"role": "system", "content": "Be brief."}
TURNS = [{"role": "user", "content": "Hi there!"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."}]


def _tokenizer(specials: list[str], bos: str | None, eos: str, template: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", *specials],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["hello there, how are you? fine thanks. be brief."], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token="<pad>",
                                   additional_special_tokens=[s for s in specials if s not in (bos, eos)])
    fast.chat_template = MISTRAL if template == "mistral" else (TEMPLATES / f"{template}.jinja").read_text()
    return fast


def _targets(tokenizer, messages: list[dict]) -> tuple[list[str], str]:
    """The target spans (decoded, one per run of target tokens) and the whole decoded conversation."""
    tokenize = RowTokenizer(tokenizer, DataSource(path="x.jsonl", format="messages"), "messages", "data.train")
    ids, prompt_length, mask = tokenize("line 1", {"messages": messages})
    assert mask.index(1) == prompt_length
    spans, current = [], []
    for token, is_target in zip(ids, mask):
        if is_target:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans, tokenizer.decode(ids)


@pytest.mark.parametrize("template", list(CASES))
@pytest.mark.parametrize("with_system", [False, True], ids=["no-system", "system"])
def test_only_assistant_turns_are_targets(template: str, with_system: bool) -> None:
    specials, bos, eos, turn_end = CASES[template]
    tokenizer = _tokenizer(specials, bos, eos, template)
    if template == "mistral" and with_system:
        pytest.skip("this Mistral template has no system turn")
    messages = ([SYSTEM] if with_system else []) + TURNS
    spans, whole = _targets(tokenizer, messages)
    answers = [m["content"] for m in TURNS if m["role"] == "assistant"]
    assert len(spans) == len(answers)
    trained = "".join(spans)
    for answer in answers:
        assert answer in trained
    assert "Hi there" not in trained and "How are you" not in trained and "Be brief" not in trained
    for span, answer in zip(spans, answers):  # each turn: its answer (after any template prefix) and its end token
        body = span.split(turn_end)[0]
        assert body.endswith(answer) and turn_end in span, (span, answer)
    assert whole == tokenizer.apply_chat_template(messages, tokenize=False)
    single, _ = _targets(tokenizer, messages[: 2 + with_system])
    assert single[0].split(turn_end)[0].endswith("Hello!")


def test_phi3_end_of_conversation_token_is_trained_only_at_the_end() -> None:
    spans, _ = _targets(_tokenizer(*CASES["phi3"][:3], "phi3"), TURNS)
    assert spans == ["Hello!<|end|>\n", "Fine, thanks.<|end|>\n<|endoftext|>"]


def test_deepseek_generation_prompt_think_is_not_a_history_rewrite() -> None:
    spans, _ = _targets(_tokenizer(*CASES["deepseek_r1_distill"][:3], "deepseek_r1_distill"), TURNS[:2])
    assert spans == ["Hello!<｜end▁of▁sentence｜>"]


def test_qwen3_multi_turn_rewrite_is_refused_precisely() -> None:
    tokenizer = _tokenizer(QWEN, None, "<|im_end|>", "qwen3")
    assert _targets(tokenizer, TURNS[:2])[0] == ["<think>\n\n</think>\n\nHello!<|im_end|>\n"]  # one turn: fine
    with pytest.raises(UserError, match=r"line 1: the chat template renders message 1 .*differently once later turns "
                                        r"follow .*at character \d+ it reads '<think>.*on its own but 'Hello!"):
        _targets(tokenizer, TURNS)
