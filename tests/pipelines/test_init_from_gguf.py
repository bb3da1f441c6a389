"""A student initialised from a teacher given as a ``.gguf`` file, as the teacher pass takes it."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from logitstore.errors import ConfigError
from logitstore.pipelines._student import init_from_teacher, load_student, load_tokenizer


def test_a_folder_of_gguf_files_is_answered_with_the_file_path_to_give(tmp_path, tiny_teacher_dir):
    student = load_student(str(tiny_teacher_dir))
    folder = tmp_path / "teacher"
    folder.mkdir()
    (folder / "model.Q4_1.gguf").write_bytes(b"")
    with pytest.raises(ConfigError) as info:
        init_from_teacher(student, str(folder), [0, 1])
    assert str(folder / "model.Q4_1.gguf") in str(info.value)


@pytest.mark.slow
def test_student_initialised_from_a_gguf_file_takes_the_dequantised_weights(
    tmp_path, gguf_teacher_path
):
    folder, name = gguf_teacher_path.parent, gguf_teacher_path.name
    teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    config["num_hidden_layers"] = 2
    for key in ("architectures", "transformers_version", "dtype", "torch_dtype", "layer_types"):
        config.pop(key, None)
    path = tmp_path / "student.json"

    path.write_text(json.dumps(config))
    student = load_student(str(path))
    init_from_teacher(student, str(gguf_teacher_path), [3, 29])
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(
        s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.3.self_attn.q_proj.weight"]
    )
    assert torch.equal(
        s["model.layers.1.mlp.down_proj.weight"], t["model.layers.29.mlp.down_proj.weight"]
    )
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])

    tokenizer = load_tokenizer(str(gguf_teacher_path))
    assert (
        tokenizer.get_vocab() == AutoTokenizer.from_pretrained(folder, gguf_file=name).get_vocab()
    )
