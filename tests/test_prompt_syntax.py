"""The Stable Diffusion WebUI's prompt syntax on a Stable Diffusion folder (a tiny random one built here): the
emphasis parser, the chunks of 75 tokens (the comma rule, BREAK), exact agreement with diffusers for plain
prompts, the weights and their mean rescale, long prompts and negative prompts of other lengths end to end,
and ``--no-emphasis``."""

from __future__ import annotations

import pytest
import torch

import inkwash
from inkwash.commands.cli import main
from inkwash.interop.prompt_syntax import BREAK, ROUND, SQUARE, chunk_tokens, parse_attention
from inkwash.interop.random_folders import build_stable_diffusion
from inkwash.interop.stable_diffusion import StableDiffusion
from inkwash.sampling.options import SampleOptions

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

LONG = ", ".join(["red car"] * 14) + " abc"  # 100 tokens: the tiny tokenizer has one per character or comma


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "sd"
    build_stable_diffusion(path)
    return path


@pytest.fixture(scope="module")
def pipe(folder) -> StableDiffusion:
    return inkwash.load(folder, device="cpu")


PARSED = {
    "a car": [("a car", 1.0)],
    "a (red) car": [("a ", 1.0), ("red", ROUND), (" car", 1.0)],
    "((detailed))": [("detailed", ROUND * ROUND)],
    "[blurry]": [("blurry", SQUARE)],
    "[[blurry]]": [("blurry", SQUARE * SQUARE)],
    "(red:1.3) car": [("red", 1.3), (" car", 1.0)],
    "(red : 0.5 )": [("red ", 0.5)],
    "(a (b:1.5))": [("a ", ROUND), ("b", 1.5 * ROUND)],
    "((a:1.5) b)": [("a", 1.5 * ROUND), (" b", ROUND)],
    "[a:1.5]": [("a:1.5", SQUARE)],  # an explicit weight needs round brackets
    "(word:1.0)": [("word", 1.0)],
    "a (b:1.0) c": [("a b c", 1.0)],
    r"\(literal\) \[x\]": [("(literal) [x]", 1.0)],
    r"a \\ b": [("a \\ b", 1.0)],
    "a (unclosed": [("a ", 1.0), ("unclosed", ROUND)],
    "a [unclosed": [("a ", 1.0), ("unclosed", SQUARE)],
    "a ) b ]": [("a ) b ]", 1.0)],
    "a :1.5) b": [("a :1.5) b", 1.0)],
    "a BREAK b": [("a", 1.0), (BREAK, None), ("b", 1.0)],
    "(a BREAK b)": [("a", ROUND), (BREAK, None), ("b", ROUND)],
    "BREAKfast break": [("BREAKfast break", 1.0)],
    "": [("", 1.0)],
}


@pytest.mark.parametrize("text", list(PARSED))
def test_parse_attention(text):
    got = parse_attention(text)
    expected = PARSED[text]
    assert [part for part, _ in got] == [part for part, _ in expected]
    for (_, w), (_, e) in zip(got, expected, strict=True):
        assert (w is None) == (e is None) and (w is None or w == pytest.approx(e))


def test_chunk_tokens():
    # plain 75-token chunks without commas
    chunks = chunk_tokens([(list(range(160)), 1.0)], chunk_length=75, comma=999)
    assert [len(ids) for ids, _ in chunks] == [75, 75, 10]
    assert [token for ids, _ in chunks for token in ids] == list(range(160))
    # a comma in the last 20 tokens of a full chunk: what follows it moves on
    tokens = [*range(70), 999, *range(100, 110)]
    chunks = chunk_tokens([(tokens, 2.0)], chunk_length=75, comma=999)
    assert chunks[0][0] == [*range(70), 999] and chunks[1][0] == list(range(100, 110))
    assert chunks[1][1] == [2.0] * 10
    # a comma further back than 20 tokens does not
    tokens = [*range(50), 999, *range(100, 130)]
    assert [len(ids) for ids, _ in chunk_tokens([(tokens, 1.0)], chunk_length=75, comma=999)] == [75, 6]
    # BREAK ends a chunk; an empty prompt is one empty chunk
    chunks = chunk_tokens([([1, 2], 1.0), ([], None), ([3], 1.5)], chunk_length=75)
    assert chunks == [([1, 2], [1.0, 1.0]), ([3], [1.5])]
    assert chunk_tokens([([], 1.0)]) == [([], [])]


def test_plain_prompt_is_diffusers_exactly(pipe, folder):
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for prompt in ("a watercolor of a lighthouse", "", "x" * 75):
        expected, _ = reference.encode_prompt(prompt, "cpu", 1, False)
        got = pipe.prompts.encode([prompt], emphasis=True)
        assert got.shape == (1, 77, expected.shape[-1]) and torch.equal(got, expected.float())
        assert torch.equal(got, pipe.prompts.encode([prompt], emphasis=False))


def test_weight_one_is_plain_tokenization(pipe):
    prompts = pipe.prompts
    plain = prompts.tokenizer("a word", padding="max_length", max_length=77, truncation=True).input_ids
    for text in ("a word", "a (word:1.0)", "(a word:1)"):
        [(ids, weights)] = prompts.chunks(text)
        assert ids == plain and weights == [1.0] * 77
    assert torch.equal(prompts.encode(["a (word:1.0)"], emphasis=True), prompts.encode(["a word"], emphasis=True))


def test_weights_scale_their_positions_then_the_mean(pipe):
    prompts = pipe.prompts
    plain = prompts.encode(["a red car"], emphasis=True)[0]
    weighted = prompts.encode(["a (red:1.3) car"], emphasis=True)[0]
    [(ids, weights)] = prompts.chunks("a (red:1.3) car")
    red = [i for i, w in enumerate(weights) if w != 1.0]
    assert red == [2, 3, 4]  # after BOS and "a": r, e, d (one token per character in the tiny tokenizer)
    assert ids == prompts.chunks("a red car")[0][0]
    unscaled = weighted * (plain * torch.tensor(weights)[:, None]).mean() / plain.mean()  # before the rescale
    others = [i for i in range(77) if i not in red]
    torch.testing.assert_close(unscaled[others], plain[others])
    torch.testing.assert_close(unscaled[red], plain[red] * 1.3)
    torch.testing.assert_close(weighted.mean(), plain.mean(), atol=1e-6, rtol=1e-4)  # (about 0 in this tiny model)
    assert not torch.equal(weighted, plain)


def test_long_prompt_is_two_chunks_and_generates(pipe):
    assert len(pipe.prompts.tokenizer(LONG, add_special_tokens=False).input_ids) == 100
    embeddings = pipe.prompts.encode([LONG], emphasis=True)
    assert embeddings.shape[:2] == (1, 154)
    # the comma rule: the first chunk ends with a comma
    first, _ = pipe.prompts.chunks(LONG)[0]
    assert (
        pipe.prompts.comma in first
        and first[first.index(pipe.prompts.tokenizer.eos_token_id, 1) - 1] == pipe.prompts.comma
    )
    images = pipe.generate(prompt=LONG, steps=2, num_images=2, batch_size=2, show_progress=False)
    assert images.shape == (2, 64, 64, 3)
    short = pipe.generate(prompt="red car", steps=2, num_images=1, show_progress=False)
    assert (images[0] != short[0]).any()


@pytest.mark.parametrize(("prompt", "negative"), [(LONG, "blurry"), ("a car", LONG), ("a BREAK car", "")])
def test_prompt_and_negative_of_other_lengths(pipe, prompt, negative):
    job = pipe.prepare(SampleOptions(checkpoint="", out="", prompt=prompt, negative_prompt=negative, steps=2))
    assert job.labels.shape == job.guidance_label.shape and job.labels.shape[1] == 154
    empty = pipe.prompts.encode([""], emphasis=True)
    shorter = job.guidance_label if len(negative) < len(prompt) else job.labels
    assert torch.equal(shorter[:, 77:], empty)
    images = pipe.generate(prompt=prompt, negative_prompt=negative, steps=2, num_images=1, show_progress=False)
    assert images.shape == (1, 64, 64, 3)


def test_no_emphasis_is_diffusers(pipe, folder, capsys):
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for prompt in ("a (red:1.3) car", LONG):
        expected, _ = reference.encode_prompt(prompt, "cpu", 1, False)
        job = pipe.prepare(SampleOptions(checkpoint="", out="", prompt=prompt, emphasis=False, show_progress=True))
        assert job.labels.shape[1] == 77 and torch.equal(job.labels, expected.float())
    assert "only the first 77 are used" in capsys.readouterr().err
    weighted = pipe.prepare(SampleOptions(checkpoint="", out="", prompt="a (red:1.3) car"))
    assert not torch.equal(weighted.labels, pipe.prompts.encode(["a (red:1.3) car"], emphasis=False))


def test_cli_flag(folder, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--no-emphasis" in capsys.readouterr().out
    out = tmp_path / "out"
    args = ["sample", "--checkpoint", str(folder), "--out", str(out), "--prompt", LONG, "--steps", "1",
            "--num-images", "1", "--device", "cpu", "--no-emphasis"]  # fmt: skip
    assert main(args) == 0
    assert "only the first 77 are used" in capsys.readouterr().err
