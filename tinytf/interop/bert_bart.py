"""Hugging Face BERT and BART folders in and out: BertModel / BertForMaskedLM / BertForSequenceClassification <->
tinytf's `Encoder` / `EncoderForMaskedLM` / `EncoderForSequenceClassification`, BartForConditionalGeneration <->
`EncoderDecoder`.

Both are post-norm transformers with exact (erf) GELU and learned absolute positions. Their tensors map onto tinytf's
names as follows (block i; "{i}" below):

    tinytf (Encoder; "encoder." in     BERT ("bert." prefix inside BertForMaskedLM and
            the models with a head)   BertForSequenceClassification)
    word_embeddings                   embeddings.word_embeddings
    position_embeddings               embeddings.position_embeddings
    token_type_embeddings             embeddings.token_type_embeddings
    embedding_norm                    embeddings.LayerNorm
    blocks.i.attn.c_attn              encoder.layer.i.attention.self.query | key | value
    blocks.i.attn.c_proj              encoder.layer.i.attention.output.dense
    blocks.i.norm1                    encoder.layer.i.attention.output.LayerNorm
    blocks.i.mlp.c_fc / c_proj        encoder.layer.i.intermediate.dense / output.dense
    blocks.i.norm2                    encoder.layer.i.output.LayerNorm
    head.dense / head.norm            cls.predictions.transform.dense / transform.LayerNorm   (masked LM)
    head.lm_head.decoder.bias         cls.predictions.bias (the decoder's weight is the tied word embeddings)
    head.pooler / head.classifier     bert.pooler.dense / classifier                            (classification)

    tinytf (EncoderDecoder)           BART ("model." prefix but final_logits_bias and lm_head)
    shared                            shared (encoder.embed_tokens and decoder.embed_tokens are the same tensor
                                      when tie_word_embeddings; untied, each stack reads its own)
    {en,de}coder.embed_tokens         {en,de}coder.embed_tokens (share_embeddings=False: a folder with untied
                                      tables that differ; transformers then ignores shared, which is saved as a
                                      copy of the encoder's table)
    {en,de}coder.embed_positions      {en,de}coder.embed_positions (max_positions + 2 rows: BART's offset of 2;
                                      a model with another position_offset is saved shifted to it)
    {en,de}coder.layernorm_embedding  {en,de}coder.layernorm_embedding
    {en,de}coder.blocks.i.attn.c_attn {en,de}coder.layers.i.self_attn.q_proj | k_proj | v_proj
    ....blocks.i.attn.c_proj / norm1  ....layers.i.self_attn.out_proj / self_attn_layer_norm
    decoder.blocks.i.cross_attn.q_proj, kv_proj, c_proj, cross_norm
                                      decoder.layers.i.encoder_attn.q_proj, k_proj | v_proj, out_proj,
                                      encoder_attn_layer_norm
    ....blocks.i.mlp.c_fc / c_proj / norm2    ....layers.i.fc1 / fc2 / final_layer_norm
    final_logits_bias                 final_logits_bias (1, vocab_size)

BERT's pooler (BertModel's pooler.dense) has no place in `Encoder` and is skipped on loading. BART's generation
settings forced_bos_token_id / forced_eos_token_id (the tokens generate forces at the first / last step) are read
from generation_config.json where the folder has one (as transformers does), else from config.json (BartConfig's
defaults: none, and 2), into EncoderDecoderConfig; save_pretrained writes them into config.json. The other
generation settings (beams, lengths, n-gram blocking) are left to generate's arguments.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

from .. import backend
from ..checkpoint import CheckpointError, load_json
from ..models.encoder import Encoder, EncoderConfig, EncoderForMaskedLM, EncoderForSequenceClassification
from ..models.encoder_decoder import EncoderDecoder, EncoderDecoderConfig
from ..nn import Module, skip_init
from .hf import (_REQUIRED, CONFIG_FILE, _checkpoint_dtype, _floating_dtype, _read_weights, _Settings,
                 check_weights_fit, write_folder)

MODEL_TYPES = ("bert", "bart")
GENERATION_CONFIG_FILE = "generation_config.json"
_FORCED_TOKEN_DEFAULTS = {"forced_bos_token_id": None, "forced_eos_token_id": 2}  # BartConfig's
BertOrBart = Encoder | EncoderForMaskedLM | EncoderForSequenceClassification | EncoderDecoder
BART_POSITION_OFFSET = 2  # BART's learned positions start at row 2 (rows 0 and 1: a fairseq padding artefact)

# --- tensor names -----------------------------------------------------------------------------------------------------
# tinytf module ("{i}": a block's index) -> the Hugging Face module(s) it is made of; several are concatenated rows.
_BERT_ENCODER = {
    "word_embeddings": ("embeddings.word_embeddings",),
    "position_embeddings": ("embeddings.position_embeddings",),
    "token_type_embeddings": ("embeddings.token_type_embeddings",),
    "embedding_norm": ("embeddings.LayerNorm",),
    "blocks.{i}.attn.c_attn": tuple(f"encoder.layer.{{i}}.attention.self.{name}" for name in ("query", "key", "value")),
    "blocks.{i}.attn.c_proj": ("encoder.layer.{i}.attention.output.dense",),
    "blocks.{i}.norm1": ("encoder.layer.{i}.attention.output.LayerNorm",),
    "blocks.{i}.mlp.c_fc": ("encoder.layer.{i}.intermediate.dense",),
    "blocks.{i}.mlp.c_proj": ("encoder.layer.{i}.output.dense",),
    "blocks.{i}.norm2": ("encoder.layer.{i}.output.LayerNorm",),
}
_BERT_MLM = {
    **{f"encoder.{ours}": tuple(f"bert.{name}" for name in theirs) for ours, theirs in _BERT_ENCODER.items()},
    "head.dense": ("cls.predictions.transform.dense",),
    "head.norm": ("cls.predictions.transform.LayerNorm",),
    "head.lm_head.decoder": ("cls.predictions",),  # its bias; its weight is tied to the word embeddings
}
_BERT_CLASSIFIER = {
    **{ours: theirs for ours, theirs in _BERT_MLM.items() if ours.startswith("encoder.")},
    "head.pooler": ("bert.pooler.dense",),
    "head.classifier": ("classifier",),
}


def _bart_stack(stack: str) -> dict:
    layer = f"model.{stack}.layers.{{i}}"
    return {
        f"{stack}.embed_tokens": (f"model.{stack}.embed_tokens",),
        f"{stack}.embed_positions": (f"model.{stack}.embed_positions",),
        f"{stack}.layernorm_embedding": (f"model.{stack}.layernorm_embedding",),
        f"{stack}.blocks.{{i}}.attn.c_attn": tuple(f"{layer}.self_attn.{p}_proj" for p in "qkv"),
        f"{stack}.blocks.{{i}}.attn.c_proj": (f"{layer}.self_attn.out_proj",),
        f"{stack}.blocks.{{i}}.norm1": (f"{layer}.self_attn_layer_norm",),
        f"{stack}.blocks.{{i}}.cross_attn.q_proj": (f"{layer}.encoder_attn.q_proj",),
        f"{stack}.blocks.{{i}}.cross_attn.kv_proj": (f"{layer}.encoder_attn.k_proj", f"{layer}.encoder_attn.v_proj"),
        f"{stack}.blocks.{{i}}.cross_attn.c_proj": (f"{layer}.encoder_attn.out_proj",),
        f"{stack}.blocks.{{i}}.cross_norm": (f"{layer}.encoder_attn_layer_norm",),
        f"{stack}.blocks.{{i}}.mlp.c_fc": (f"{layer}.fc1",),
        f"{stack}.blocks.{{i}}.mlp.c_proj": (f"{layer}.fc2",),
        f"{stack}.blocks.{{i}}.norm2": (f"{layer}.final_layer_norm",),
    }


_BART = {
    "shared": ("model.shared",),
    **_bart_stack("encoder"),
    **_bart_stack("decoder"),
    "lm_head": ("lm_head",),
    "": ("",),  # the model's own buffer, final_logits_bias
}
_TABLES = {Encoder: _BERT_ENCODER, EncoderForMaskedLM: _BERT_MLM, EncoderForSequenceClassification: _BERT_CLASSIFIER,
           EncoderDecoder: _BART}
MODEL_CLASSES = tuple(_TABLES)  # the models save_pretrained writes
_BERT_CLASSES = {Encoder: "BertModel", EncoderForMaskedLM: "BertForMaskedLM",
                 EncoderForSequenceClassification: "BertForSequenceClassification"}
# Tensors a checkpoint may hold that tinytf does not use: BERT's pooler (unless classifying), its next-sentence head
# (BertForPreTraining), the position ids of old checkpoints and the masked-LM decoder's copies of the tied weights.
_IGNORED = re.compile(r"^(bert\.)?(pooler\.|embeddings\.position_ids$)"
                      r"|^cls\.(seq_relationship\.|predictions\.decoder\.)")
_BART_SHARED = "model.shared.weight"
_BART_STACK_TABLES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")


def _tensor_names(model: Module) -> dict[str, tuple[str, ...] | str]:
    """tinytf state-dict name -> the Hugging Face tensor names it is made of (rows concatenated in this order), or,
    for a parameter tied to an earlier one, that one's tinytf name."""
    table = _TABLES[type(model)]
    first_names = {}
    names = {}
    for module_name, module in model.named_modules():
        dot = f"{module_name}." if module_name else ""
        for kind, parameter in module._parameters.items():
            ours = dot + kind
            if id(parameter) in first_names:
                names[ours] = first_names[id(parameter)]
                continue
            first_names[id(parameter)] = ours
            names[ours] = _their_names(table, module_name, kind)
        for kind in module._persistent_buffers:
            names[dot + kind] = _their_names(table, module_name, kind)
    return names


def _their_names(table: dict, module_name: str, kind: str) -> tuple[str, ...]:
    """The Hugging Face names of the tensor `kind` ("weight", "bias") of one tinytf module ("" for the model)."""
    index = re.search(r"\.(\d+)\.", module_name)  # a block's
    key = f"{module_name[:index.start()]}.{{i}}.{module_name[index.end():]}" if index else module_name
    if key not in table:
        raise ValueError(f"tinytf.interop: {module_name!r} has no counterpart in the Hugging Face layout")
    names = (name.format(i=index[1] if index else None) for name in table[key])
    return tuple(f"{name}.{kind}" if name else kind for name in names)


# --- loading ----------------------------------------------------------------------------------------------------------
def from_pretrained(path, device: str = "cpu", dtype=None) -> BertOrBart:
    """A BERT (BertModel -> Encoder, BertForMaskedLM -> EncoderForMaskedLM, BertForSequenceClassification ->
    EncoderForSequenceClassification, told apart by their tensors) or BART (BartForConditionalGeneration ->
    EncoderDecoder) model from a local Hugging Face folder, in eval mode, on `device`; dtype as
    tinytf.interop.hf.from_pretrained. Raises CheckpointError naming the file and the problem."""
    device = backend.check_device(device)
    if dtype is not None and dtype != "auto":
        dtype = _floating_dtype(dtype)
    folder = Path(path)
    if not (folder / CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} holds no {CONFIG_FILE}: it is not a local Hugging Face model folder")
    settings = _Settings(load_json(folder / CONFIG_FILE), folder / CONFIG_FILE)
    model_type = settings.get("model_type")
    if model_type not in MODEL_TYPES:
        raise CheckpointError(f"{settings.path}: model_type={model_type!r} is not BERT or BART")
    tensors = _read_weights(folder)
    try:
        if model_type == "bart":
            build = partial(EncoderDecoder, EncoderDecoderConfig(**_bart_fields(settings, tensors)))
        elif "classifier.weight" in tensors:
            # transformers counts the classes by id2label's entries (2 without one)
            n_classes = len(settings.get("id2label", None) or range(settings.get("num_labels", 2)))
            build = partial(EncoderForSequenceClassification, EncoderConfig(**_bert_fields(settings)), n_classes)
        elif any(name.startswith("cls.predictions.") for name in tensors):
            build = partial(EncoderForMaskedLM, EncoderConfig(**_bert_fields(settings)))
        else:
            build = partial(Encoder, EncoderConfig(**_bert_fields(settings)))
    except CheckpointError:
        raise
    except (ArithmeticError, TypeError, ValueError) as error:  # values the configs reject, such as 0 heads
        raise CheckpointError(f"{settings.path}: {error}") from None
    if dtype == "auto":
        dtype = _checkpoint_dtype(settings)
    with skip_init(), np.errstate(over="ignore", invalid="ignore"):  # every parameter is loaded below
        model = build().to(dtype or backend.DEFAULT_DTYPE)
    model.load_state_dict(_state_from(tensors, model, folder))
    return model.to(device).eval()


def _bert_fields(settings: _Settings) -> dict:
    settings.refuse_unless("hidden_act", "gelu", ("gelu",), "the MLP uses the exact (erf) GELU")
    settings.refuse_unless("position_embedding_type", "absolute", ("absolute",), "positions are learned absolute")
    settings.refuse_unless("is_decoder", False, (False,), "BERT is loaded as a bidirectional encoder")
    settings.refuse_unless("add_cross_attention", False, (False,), "an encoder has no cross-attention")
    return dict(
        vocab_size=settings.get("vocab_size"), max_positions=settings.get("max_position_embeddings", 512),
        type_vocab_size=settings.get("type_vocab_size", 2), n_layer=settings.get("num_hidden_layers"),
        n_head=settings.get("num_attention_heads"), n_embd=settings.get("hidden_size"),
        mlp_hidden=settings.get("intermediate_size"), dropout=settings.get("hidden_dropout_prob", 0.1),
        norm_eps=settings.get("layer_norm_eps", 1e-12), activation="gelu", norm_first=False,
        pad_token_id=settings.get("pad_token_id", 0),
    )


def _bart_fields(settings: _Settings, tensors: dict[str, np.ndarray]) -> dict:
    settings.refuse_unless("activation_function", "gelu", ("gelu",), "the MLP uses the exact (erf) GELU")
    for encoder_key, decoder_key in (("encoder_attention_heads", "decoder_attention_heads"),
                                     ("encoder_ffn_dim", "decoder_ffn_dim")):
        if settings.get(encoder_key, _REQUIRED) != settings.get(decoder_key, _REQUIRED):
            raise CheckpointError(f"{settings.path}: {encoder_key}={settings.get(encoder_key)!r} with "
                                  f"{decoder_key}={settings.get(decoder_key)!r} is not supported (tinytf's encoder "
                                  "and decoder have the same number of heads and MLP width)")
    return dict(
        vocab_size=settings.get("vocab_size"), max_positions=settings.get("max_position_embeddings", 1024),
        d_model=settings.get("d_model"), n_head=settings.get("encoder_attention_heads"),
        encoder_layers=settings.get("encoder_layers"), decoder_layers=settings.get("decoder_layers"),
        ffn_dim=settings.get("encoder_ffn_dim"), dropout=settings.get("dropout", 0.1), activation="gelu",
        norm_first=False, positions="learned", position_offset=BART_POSITION_OFFSET,
        scale_embedding=settings.get("scale_embedding", False), layernorm_embedding=True, final_norm=False,
        share_embeddings=_one_token_table(settings, tensors),
        tie_word_embeddings=settings.get("tie_word_embeddings", True), norm_eps=1e-5,
        pad_token_id=settings.get("pad_token_id", 1), bos_token_id=settings.get("bos_token_id", 0),
        eos_token_id=settings.get("eos_token_id", 2),
        decoder_start_token_id=settings.get("decoder_start_token_id", 2),
        **_forced_tokens(settings),
    )


def _forced_tokens(settings: _Settings) -> dict:
    """forced_bos_token_id and forced_eos_token_id as transformers' generate reads them: generation_config.json alone
    where the folder has one (a key it lacks is None), else config.json with BartConfig's defaults."""
    path = settings.path.parent / GENERATION_CONFIG_FILE
    if path.is_file():
        generation = load_json(path)
        return {key: generation.get(key) for key in _FORCED_TOKEN_DEFAULTS}
    return {key: settings.get(key, default) for key, default in _FORCED_TOKEN_DEFAULTS.items()}


def _one_token_table(settings: _Settings, tensors: dict[str, np.ndarray]) -> bool:
    """Whether BART's stacks read one token table: tied (transformers then overwrites the stacks' tables with
    model.shared), or untied with tables that equal model.shared anyway."""
    if settings.get("tie_word_embeddings", True):
        return True
    shared = tensors.get(_BART_SHARED)
    return all(name not in tensors or (shared is not None and np.array_equal(tensors[name], shared))
               for name in _BART_STACK_TABLES)


def _ignored_by(model: Module):
    """The predicate of the checkpoint tensors `model` does not read (besides those it expects)."""
    if not isinstance(model, EncoderDecoder):
        return lambda name: bool(_IGNORED.search(name))
    # tied, the stacks' tables and lm_head are copies of model.shared; with a table per stack, model.shared is unread
    unread = {"lm_head.weight", *_BART_STACK_TABLES} if model.shared is not None else {_BART_SHARED}
    return lambda name: name in unread


def _state_from(tensors: dict[str, np.ndarray], model: Module, folder: Path) -> dict[str, np.ndarray]:
    """The model's state dict built from a checkpoint's tensors; one error lists every missing, unexpected or
    mis-shaped tensor."""
    names = _tensor_names(model)
    own = model.state_dict()
    # A bare BertModel names its tensors without the "bert." that BERT with a head (one tinytf lacks) puts before them.
    if isinstance(model, Encoder) and any(name.startswith("bert.") for name in tensors):
        tensors = {name.removeprefix("bert."): array for name, array in tensors.items()}
    expected = {}
    for ours, theirs in names.items():
        if isinstance(theirs, tuple):
            rows = own[ours].shape[0] // len(theirs)  # fused tensors are made of equal parts
            expected.update({name: (rows, *own[ours].shape[1:]) for name in theirs})
    check_weights_fit(folder, tensors, expected, _ignored_by(model))
    state = {}
    for ours, theirs in names.items():
        if isinstance(theirs, tuple):
            parts = [tensors[name] for name in theirs]
            state[ours] = np.concatenate(parts) if len(parts) > 1 else parts[0]
    for ours, tied_to in names.items():
        if isinstance(tied_to, str):
            state[ours] = state[tied_to]
    return state


# --- saving -----------------------------------------------------------------------------------------------------------
def save_pretrained(model: BertOrBart, path) -> Path:
    """Write `config.json` and `model.safetensors` into the folder `path`, in the layout that transformers'
    BertModel, BertForMaskedLM, BertForSequenceClassification or BartForConditionalGeneration loads (see
    tinytf.interop.hf.save_pretrained for the atomic replacement of the folder's files). Returns the folder."""
    if type(model) not in MODEL_CLASSES:
        raise ValueError(f"save_pretrained: BERT or BART models are {', '.join(cls.__name__ for cls in _TABLES)}; "
                         f"got {type(model).__name__}")
    hf_config = _bart_entries(model.config) if isinstance(model, EncoderDecoder) else _bert_entries(model)
    state = model.state_dict()
    hf_config["dtype"] = hf_config["torch_dtype"] = next(iter(state.values())).dtype.name
    tensors = {}
    for ours, theirs in _tensor_names(model).items():
        if isinstance(theirs, tuple):
            array = backend.to_numpy(state[ours])
            for name, part in zip(theirs, np.split(array, len(theirs))):
                tensors[name] = np.ascontiguousarray(part)  # safetensors writes the raw buffer
    if isinstance(model, EncoderDecoder):
        for stack in ("encoder", "decoder"):
            name = f"model.{stack}.embed_positions.weight"
            tensors[name] = _bart_position_table(tensors[name], model.config.position_offset)
    if isinstance(model, EncoderDecoder) and not model.config.tie_word_embeddings:
        # transformers ties the stacks' tables to model.shared only together with lm_head: untied, it reads them,
        # and keeps model.shared, unread, as the input embeddings it reports.
        if model.shared is not None:
            tensors.update(dict.fromkeys(_BART_STACK_TABLES, tensors[_BART_SHARED]))
        else:
            tensors[_BART_SHARED] = tensors[_BART_STACK_TABLES[0]]
    return write_folder(Path(path), tensors, hf_config)


def _bert_entries(model: Encoder | EncoderForMaskedLM | EncoderForSequenceClassification) -> dict:
    config = model.config
    if config.norm_first or config.activation != "gelu":
        raise ValueError(f"save_pretrained: BERT is post-norm with exact GELU; this model has "
                         f"norm_first={config.norm_first}, activation={config.activation!r}")
    return {
        "architectures": [_BERT_CLASSES[type(model)]],
        "model_type": "bert", "vocab_size": config.vocab_size, "max_position_embeddings": config.max_positions,
        "type_vocab_size": config.type_vocab_size, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden,
        "hidden_act": "gelu", "layer_norm_eps": config.norm_eps, "hidden_dropout_prob": config.dropout,
        "attention_probs_dropout_prob": config.dropout, "pad_token_id": config.pad_token_id,
        "tie_word_embeddings": True,
        **({"num_labels": model.n_classes} if isinstance(model, EncoderForSequenceClassification) else {}),
    }


def _bart_entries(config: EncoderDecoderConfig) -> dict:
    expected = dict(norm_first=False, positions="learned", layernorm_embedding=True, final_norm=False,
                    activation="gelu")
    different = {key: getattr(config, key) for key, value in expected.items() if getattr(config, key) != value}
    if different:
        raise ValueError(f"save_pretrained: BART has {expected}; this model has {different}")
    if config.tie_word_embeddings and not config.share_embeddings:
        raise ValueError("save_pretrained: BART ties lm_head to one token table for both stacks; this model has a "
                         "table per stack (share_embeddings=False) with tie_word_embeddings=True")
    return {
        "architectures": ["BartForConditionalGeneration"], "model_type": "bart", "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_positions, "d_model": config.d_model,
        "encoder_attention_heads": config.n_head, "decoder_attention_heads": config.n_head,
        "encoder_layers": config.encoder_layers, "decoder_layers": config.decoder_layers,
        "encoder_ffn_dim": config.ffn_dim, "decoder_ffn_dim": config.ffn_dim, "activation_function": "gelu",
        "dropout": config.dropout, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "scale_embedding": config.scale_embedding, "tie_word_embeddings": config.tie_word_embeddings,
        "pad_token_id": config.pad_token_id, "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id, "decoder_start_token_id": config.decoder_start_token_id,
        "forced_bos_token_id": config.forced_bos_token_id, "forced_eos_token_id": config.forced_eos_token_id,
        "is_encoder_decoder": True,
    }


def _bart_position_table(table: np.ndarray, offset: int) -> np.ndarray:
    """A learned position table whose position p is row p + offset, as BART's: position p at row p + 2. The rows
    before the first position are never read: dropped, or zeros where BART has more of them."""
    if offset >= BART_POSITION_OFFSET:
        return table[offset - BART_POSITION_OFFSET:]
    return np.concatenate([np.zeros((BART_POSITION_OFFSET - offset, table.shape[1]), table.dtype), table])
