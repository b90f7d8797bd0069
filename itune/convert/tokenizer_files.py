"""Tokenizer files of a Hugging Face model folder, and the chat template of a chat format.

`save_tokenizer` writes any itune tokenizer (a folder of files, an `HFTokenizer`, a
`SentencePieceTokenizer`) as transformers reads it, with a model's own Jinja template or one
that renders as `itune.data.chat.render` does for a built-in format; `load_hf_tokenizer` reads a
folder back with its template.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

from itune.data.hf_tokenizer import HFTokenizer, load_tokenizer_path
from itune.data.jinja_template import ChatTemplate, special_tokens_of
from itune.data.tokenizer import SentencePieceTokenizer

# Tokenizer files of a Hugging Face model folder, copied as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(file: str, value: Any) -> None:
    with open(file, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=2, ensure_ascii=False)
        f.write("\n")


def save_tokenizer(path: str, tokenizer: Any, chat_format: Any = None) -> dict[str, int | None]:
    """Writes ``tokenizer`` (a folder, an `HFTokenizer` or a `SentencePieceTokenizer`) into the
    folder ``path`` with ``chat_format``'s template; returns the ``bos/eos/pad_token_id`` for
    config.json. `load_hf_tokenizer` reads it back."""

    config: dict[str, Any] = {}
    meta_template = None  # The template of an itune folder's GGUF metadata.
    if isinstance(tokenizer, (str, os.PathLike)):
        source = os.fspath(tokenizer)
        if not os.path.isdir(source):
            raise ValueError(f"tokenizer {source}: expected a folder of tokenizer files")
        has_hf = any(
            os.path.exists(os.path.join(source, f))
            for f in ("tokenizer.json", "tokenizer_config.json")
        )
        loaded = _load_tokenizer(source)
        if has_hf:
            for name in TOKENIZER_FILES:
                if os.path.exists(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(path, name))
            config_file = os.path.join(path, "tokenizer_config.json")
            config = read_json(config_file) if os.path.exists(config_file) else {}
        else:
            tokenizer = loaded
            meta_file = os.path.join(source, "tokenizer_meta.json")
            meta = read_json(meta_file) if os.path.exists(meta_file) else {}
            meta_template = meta.get("tokenizer.chat_template")
    else:
        loaded = tokenizer
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.backend.save(os.path.join(path, "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": bool(tokenizer.add_bos_token),
            **{
                f"{role}_token": tokenizer.backend.id_to_token(token_id)
                for role, token_id in (
                    ("bos", tokenizer.bos_id),
                    ("eos", tokenizer.eos_id),
                    ("pad", tokenizer.pad_id),
                )
                if token_id >= 0
            },
        }
    elif isinstance(tokenizer, SentencePieceTokenizer):
        # transformers reads a SentencePiece model through its Llama tokenizer (exactly for BPE
        # models; itune reads the file back as it is, whatever the model type).
        processor = tokenizer._sp  # noqa: SLF001  (SentencePieceTokenizer has no accessor yet)
        with open(os.path.join(path, "tokenizer.model"), "wb") as f:
            f.write(processor.serialized_model_proto())
        config = {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,  # As itune's chat tokenization does for SentencePiece.
            "add_eos_token": False,
            "legacy": True,  # Text after a special token keeps SentencePiece's space prefix.
            **{
                f"{role}_token": processor.id_to_piece(token_id)
                for role, token_id in (
                    ("bos", tokenizer.bos_id),
                    ("eos", tokenizer.eos_id),
                    ("pad", tokenizer.pad_id),
                )
                if token_id >= 0
            },
        }
    elif not isinstance(tokenizer, (str, os.PathLike)):
        raise ValueError(
            "tokenizer: expected a folder, an HFTokenizer or a SentencePieceTokenizer, got "
            f"{type(tokenizer).__name__}"
        )
    if chat_format is None and meta_template:
        config["chat_template"] = meta_template
    if chat_format is not None:
        own = isinstance(chat_format, ChatTemplate)
        config["chat_template"] = chat_format.source if own else chat_template(chat_format)
        # transformers 5 prefers a chat_template.jinja file over tokenizer_config.json's.
        jinja = os.path.join(path, "chat_template.jinja")
        if os.path.exists(jinja):
            os.remove(jinja)
    write_json(os.path.join(path, "tokenizer_config.json"), config)
    ids = {}
    for role in ("bos", "eos", "pad"):
        token_id = getattr(loaded, f"{role}_id", -1)
        ids[f"{role}_token_id"] = int(token_id) if token_id is not None and token_id >= 0 else None
    return ids


def _load_tokenizer(path: str):
    has_fast = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.json"))
    if not has_fast and os.path.exists(os.path.join(path, "tokenizer.model")):
        return load_tokenizer_path(os.path.join(path, "tokenizer.model"))
    return load_tokenizer_path(path)


def _template_of(path: str) -> str | None:
    """The default chat template of a tokenizer folder (``chat_template.jinja`` first)."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    config_file = os.path.join(path, "tokenizer_config.json")
    template = read_json(config_file).get("chat_template") if os.path.exists(config_file) else None
    if isinstance(template, list):  # Named templates: the default one.
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_hf_tokenizer(path: str):
    """``(tokenizer, its chat template or None)`` of a Hugging Face model or tokenizer folder:
    ``chat_template.jinja``, else ``tokenizer_config.json``'s (the default of named ones),
    rendered with the folder's named tokens (``bos_token``...)."""
    tokenizer = _load_tokenizer(path)
    return tokenizer, folder_template(path, tokenizer)


def folder_template(path: str, tokenizer: Any) -> ChatTemplate | None:
    """The chat template of the tokenizer folder ``path`` (`load_hf_tokenizer`), or None."""
    source = _template_of(path)
    if not source:
        return None
    special = special_tokens_of(tokenizer)
    config_file = os.path.join(path, "tokenizer_config.json")
    config = read_json(config_file) if os.path.exists(config_file) else {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        value = value.get("content") if isinstance(value, Mapping) else value
        if isinstance(value, str) and value:
            special[key] = value
    name = f"{os.path.basename(os.path.normpath(path))} chat template"
    return ChatTemplate(source, name=name, special_tokens=special)


def tokenizer_path_template(path: str, tokenizer: Any = None) -> ChatTemplate | None:
    """The chat template that ``data.tokenizer.path`` ships, or None: a Hugging Face tokenizer
    folder's (`folder_template`) or a GGUF file's ``tokenizer.chat_template``; ``tokenizer`` is
    the one loaded from ``path``, whose named tokens the template is rendered with."""
    if not path:
        return None
    if path.endswith(".gguf") and os.path.isfile(path):
        from itune.convert import gguf_tokenizer  # noqa: PLC0415  (reads the file's metadata)

        return gguf_tokenizer.load_gguf_tokenizer(path)[1]
    if not os.path.isdir(path) or not _template_of(path):
        return None
    return folder_template(path, tokenizer if tokenizer is not None else _load_tokenizer(path))


def chat_template(chat_format: Any) -> str:
    """A Jinja chat template that renders as `itune.data.chat.render` does for ``chat_format``
    (a name, config or `ChatFormat`): ``apply_chat_template(..., tokenize=False)`` gives the
    same text, with ``add_generation_prompt`` opening an assistant turn."""
    from itune.data import chat  # noqa: PLC0415

    fmt = chat.get_format(chat_format)

    def lit(value: Any) -> str:  # JSON string and dict literals are Jinja literals too.
        return json.dumps(value, ensure_ascii=True)

    content = "message['content'] | trim" if fmt.strip_content else "message['content']"
    merge = fmt.system == "merge"
    parts = [
        "{%- set prefix = " + lit(dict(fmt.prefix)) + " -%}",
        "{%- set suffix = " + lit(dict(fmt.suffix)) + " -%}",
        "{%- set ns = namespace(system='') -%}",
        "{%- set turns = messages -%}",
    ]
    if merge:
        parts += [
            "{%- if messages and messages[0]['role'] == 'system' -%}",
            "{%- set ns.system = messages[0]['content'] + " + lit(fmt.system_join) + " -%}",
            "{%- set turns = messages[1:] -%}",
            "{%- endif -%}",
        ]
    parts += [
        "{{- " + lit(fmt.bos_token) + " -}}" if fmt.bos_token else "",
        "{%- for message in turns -%}",
        "{%- if message['role'] not in prefix -%}",
        "{{- raise_exception('chat format "
        + fmt.name
        + " has no ' + message['role'] + ' role') -}}",
        "{%- endif -%}",
        "{%- if not loop.first -%}{{- " + lit(fmt.separator) + " -}}{%- endif -%}",
        "{{- prefix[message['role']] -}}",
        "{%- if loop.first -%}{{- ns.system -}}{%- endif -%}",
        "{{- " + content + " -}}",
        "{{- suffix.get(message['role'], '') -}}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{%- if turns -%}{{- " + lit(fmt.separator) + " -}}{%- endif -%}",
        "{{- prefix['assistant'] -}}",
        "{%- endif -%}",
    ]
    return "".join(parts)


def tokenizer_template(data_config: Any, tokenizer: Any = None) -> Any:
    """The chat template of ``data.tokenizer.path`` (a Hugging Face tokenizer folder or a GGUF
    file that ships one) when ``data.chat_format`` is ``'auto'``; else None."""
    from itune.data import chat  # noqa: PLC0415

    path = data_config.tokenizer.get("path") if "tokenizer" in data_config else None
    if not path or data_config.get("chat_format", chat.AUTO) not in (chat.AUTO, None, ""):
        return None
    return tokenizer_path_template(path, tokenizer)
