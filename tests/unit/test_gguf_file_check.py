"""`model_file_problem`: a local model file that is no GGUF llama.cpp could load is named
with its reason, read from its header alone; `chat_templates`, read in the same walk."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.gguf import chat_template_text, chat_templates, model_file_problem
from tests.gguf_files import gguf_with, whole_gguf

_WHOLE = whole_gguf({"general.architecture": "gemma3"}, tensors=3)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"version https://git-lfs.github.com/spec/v1\n", "is not a GGUF model file"),
        (b"<!DOCTYPE html><html>Not Found</html>", "is not a GGUF model file"),
        (b"GGUF", "is not a GGUF model file"),
        (gguf_with({}, version=1), "is GGUF version 1, which llama.cpp cannot load"),
        (gguf_with({}, version=4), "is GGUF version 4, which llama.cpp cannot load"),
        (_WHOLE[:40], "is cut short or corrupt: its GGUF header does not read to its end"),
        (_WHOLE[:-1], "is cut short: it holds"),
        (gguf_with({}, tensors=2), "is cut short: it holds"),
    ],
    ids=["lfs-pointer", "html", "magic-alone", "v1", "v4", "header-cut", "data-cut", "no-data"],
)
def test_a_file_llama_cpp_cannot_load_is_named_with_why(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    """Not a GGUF, a version llama.cpp refuses, or cut short: the path and why."""
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    problem = model_file_problem(model)
    assert problem is not None
    assert problem.startswith(f"{model} {reason}"), problem


@pytest.mark.parametrize(
    "content", [_WHOLE, gguf_with({"tokenizer.chat_template": "{{x}}"})], ids=["whole", "metadata"]
)
def test_a_whole_gguf_passes(tmp_path: Path, content: bytes) -> None:
    """A file holding every tensor its header lists (none, for a metadata-only one) passes."""
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    assert model_file_problem(model) is None


def test_a_file_cut_short_in_its_tensor_list_still_has_its_chat_templates(
    tmp_path: Path,
) -> None:
    """The templates are metadata, which comes before the tensor list: a file cut short
    inside that list has its problem named and its templates read, as a file whose data
    alone is cut short does. One cut inside its metadata has none.

    Before, since the header was walked once for both, a cut inside the tensor list made
    `chat_templates` None, where reading the metadata alone had found them."""
    metadata = {"tokenizer.chat_template": "{{x}}", "tokenizer.chat_template.tool_use": "{{y}}"}
    header = gguf_with(metadata, tensors=3)
    metadata_end = len(gguf_with(metadata))
    expected = frozenset({"chat_template.default", "chat_template.tool_use"})
    for cut, problem, templates in [
        (header[: metadata_end + 20], "is cut short or corrupt", expected),
        (header, "is cut short: it holds", expected),
        (header[: metadata_end - 1], "is cut short or corrupt", None),
    ]:
        model = tmp_path / f"model-{len(cut)}.gguf"
        model.write_bytes(cut)
        assert (model_file_problem(model) or "").startswith(f"{model} {problem}")
        assert chat_templates(model) == templates


def test_the_shipped_model_file_passes() -> None:
    """The Gemma GGUF the local model serves (where assembled) is whole by this check."""
    model = Path("~/.cache/llm-gateway/gemma3-270m-q4_k_m.gguf").expanduser()
    if not model.is_file():
        pytest.skip("the model file is not assembled on this machine")
    assert model_file_problem(model) is None


def test_an_unreadable_file_says_so(tmp_path: Path) -> None:
    """A path that cannot be opened as a file is named with the system's reason."""
    problem = model_file_problem(tmp_path)
    assert problem is not None
    assert problem.startswith(f"{tmp_path} cannot be read: ")


def test_a_file_changed_since_it_was_read_is_read_again(tmp_path: Path) -> None:
    """The header read is remembered for the file as it was (the local model's start reads
    it after `serve` did): one written to or replaced since, as a restart may find it, is
    read again."""
    model = tmp_path / "model.gguf"
    model.write_bytes(_WHOLE)
    assert model_file_problem(model) is None
    model.write_bytes(_WHOLE[:-1])  # in place
    assert (model_file_problem(model) or "").startswith(f"{model} is cut short: it holds")
    page = tmp_path / "page.html"
    page.write_bytes(b"<html>".ljust(len(_WHOLE) - 1))  # its size, another inode
    page.replace(model)
    assert (model_file_problem(model) or "").startswith(f"{model} is not a GGUF model file")


def test_the_header_holds_each_chat_templates_text(tmp_path: Path) -> None:
    """`chat_template_text` of each `chat_template.NAME`, from the one walk of the header;
    None for a format the file lacks."""
    path = tmp_path / "model.gguf"
    templates = {"tokenizer.chat_template": "{{ a }}", "tokenizer.chat_template.rag": "{{ b }}"}
    path.write_bytes(whole_gguf(templates, tensors=1))
    assert chat_template_text(path, "chat_template.default") == "{{ a }}"
    assert chat_template_text(path, "chat_template.rag") == "{{ b }}"
    assert chat_template_text(path, "chat_template.tool_use") is None
