"""A ViT/DeiT student's fp32 graph with each block's attention fused into ONNX Runtime's com.microsoft Attention op,
which dynamic int8 turns into QAttention: the form that brings DeiT-tiny's int8 to 2x its fp32 on a VNNI CPU.

timm writes attention as one qkv Linear and scaled_dot_product_attention; no onnxruntime.transformers fusion
recognises that export. So the student is exported a second time in the shape ORT's BERT/ViT attention fusion
matches (separate q, k, v Linears, softmax(q.k^T / sqrt(d)).v written out, the block's residual added after its
branch: the same arithmetic), the fusion is run, and the fused file must reproduce the student's logits like any
export. The first export stays what fp32 and static int8 ship (the QDQ quantizer has no int8 Attention: its q, k
and v would stay float); only dynamic int8 is quantized from this one (guard.guarded_quantize).

Measured (benchmarks/results/int8_graph_forms.md, round-robin medians): DeiT-tiny at 224 px, 1 thread, dynamic
int8 from the fused graph runs 9.91 ms against 11.08 from edgekd's export and 20.36 for fp32 on a 2-core Xeon with
AMX (2.06x against 1.84x), with the same answers (QAttention quantizes the block's input once for q, k and v, as
the three MatMuls did). The contrib ops run in every runtime a bundle targets: onnxruntime (Python, Node),
onnxruntime-web's wasm build (tests/test_js_apps.py) and the full mobile packages.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from edgekd.artifacts import atomic_path
from edgekd.deploy.export import export_with_parity, quiet_onnxruntime
from edgekd.deploy.verify import PARITY_RTOL, check_parity
from edgekd.errors import first_line

log = logging.getLogger(__name__)


class FusableAttention(nn.Module):
    """timm's Attention with q, k and v as three Linears and the attention written out: ORT's fusion pattern."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.heads, self.head_dim = attention.num_heads, attention.head_dim
        width = attention.num_heads * attention.head_dim
        weight, bias = attention.qkv.weight.detach(), attention.qkv.bias.detach()
        self.q, self.k, self.v = (nn.Linear(weight.shape[1], width) for _ in range(3))
        for index, linear in enumerate((self.q, self.k, self.v)):
            linear.weight.data.copy_(weight[index * width:(index + 1) * width])
            linear.bias.data.copy_(bias[index * width:(index + 1) * width])
        self.proj = attention.proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q = self.q(x).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).reshape(batch, tokens, self.heads, self.head_dim).permute(0, 2, 3, 1)
        v = self.v(x).reshape(batch, tokens, self.heads, self.head_dim).transpose(1, 2)
        weights = (torch.matmul(q, k) / math.sqrt(self.head_dim)).softmax(dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, self.heads * self.head_dim)
        return self.proj(out)


class FusableBlock(nn.Module):
    """timm's Block with the residual added second (branch + x): ORT's matcher follows an Add's first parent, which
    in timm's order (x + branch) is the residual stream, not the attention's output projection."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block, self.attn = block, FusableAttention(block.attn)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b = self.block
        x = b.drop_path1(b.ls1(self.attn(b.norm1(x)))) + x
        return b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + x


def _plain_attention(block: nn.Module) -> bool:
    """A timm ViT Block whose attention is the textbook one (biased qkv, no q/k norm, no gate, no extra norm)."""
    from timm.models.vision_transformer import Attention, Block

    attention = getattr(block, "attn", None)
    if type(block) is not Block or type(attention) is not Attention:
        return False
    extras = [getattr(attention, name, None) for name in ("q_norm", "k_norm", "norm")]
    return (getattr(attention, "gate", None) is None and attention.qkv.bias is not None
            and all(m is None or isinstance(m, nn.Identity) for m in extras))


def fusable_copy(model: nn.Module) -> nn.Module | None:
    """A copy of a timm VisionTransformer (ViT, DeiT) with every block in ORT's fusable form, or None when `model`
    is not one or a block is not plain (q/k norm, gated or parallel blocks: their export is left as it is)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or not len(blocks) or not all(_plain_attention(b) for b in blocks):
        return None
    fusable = copy.deepcopy(model).cpu().eval()
    fusable.blocks = nn.Sequential(*[FusableBlock(block) for block in fusable.blocks])
    return fusable


def fuse_attention(source: Path, target: Path, heads: int, width: int) -> int:
    """ORT's ViT attention fusion of `source` into `target`; returns how many Attention ops it made. LayerNorm and
    Gelu are left to the session's own fusions, and SkipLayerNormalization, which made DeiT-tiny slower on CPU
    (quantization_host.md, "fp32 (transformer fusions)"), is not made."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("vit")
    for flag in ("enable_skip_layer_norm", "enable_bias_skip_layer_norm", "enable_gelu", "enable_bias_gelu",
                 "enable_layer_norm"):
        setattr(options, flag, False)
    with quiet_onnxruntime():
        fused = optimize_model(str(source), model_type="vit", num_heads=heads, hidden_size=width, opt_level=0,
                               use_gpu=False, optimization_options=options)
        fused.save_model_to_file(str(target))
    return sum(1 for node in onnx.load(str(target)).graph.node if node.op_type == "Attention")


def export_attention_fused(model: nn.Module, path: Path, input_size: tuple[int, int, int], *, opset: int = 17,
                           check_inputs: np.ndarray | None = None) -> Path | None:
    """`model`'s fp32 graph with attention fused at `path` (whole or not at all), checked against `model`'s own
    logits; None when `model` has no attention ORT can fuse (every CNN), the fusion missed a block, or anything on
    the way failed: this is a faster form of a model whose plain export already went through, never a new way for
    an export to fail."""
    try:
        fusable = fusable_copy(model)
        return None if fusable is None else _export_fused(model, fusable, path, input_size, opset, check_inputs)
    except Exception as error:  # noqa: BLE001 - exporter, onnxruntime.transformers and ORT fail in many ways
        log.warning("attention fusion left out: %s", first_line(error))
        return None


def _export_fused(model: nn.Module, fusable: nn.Module, path: Path, input_size: tuple[int, int, int], opset: int,
                  check_inputs: np.ndarray | None) -> Path | None:
    blocks = len(fusable.blocks)
    heads, width = fusable.blocks[0].attn.heads, fusable.blocks[0].attn.heads * fusable.blocks[0].attn.head_dim
    inputs = check_inputs if check_inputs is not None else \
        np.random.default_rng(0).standard_normal((2, *input_size)).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="edgekd-fusion-") as work:
        split, fused_path = Path(work) / "split.onnx", Path(work) / "fused.onnx"
        export_with_parity(fusable, split, input_size, opset=opset, check_inputs=inputs)
        fused = fuse_attention(split, fused_path, heads, width)
        if fused != blocks:
            log.info("attention fusion: %d of %d blocks fused; dynamic int8 quantizes the export as it is",
                     fused, blocks)
            return None
        # never quantize a graph that does not compute the student: checked against the model itself
        parity = check_parity(copy.deepcopy(model).cpu().eval(), fused_path, inputs, PARITY_RTOL)
        with atomic_path(path) as tmp:
            shutil.copyfile(fused_path, tmp)
    log.info("attention fusion: %d blocks fused into Attention ops (max |logit diff| %.2g)", blocks,
             parity.max_abs_diff)
    return path
