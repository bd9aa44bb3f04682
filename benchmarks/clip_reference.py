"""References for `clip-vit-b16`: real photographs in CLIP's preprocessing, and an onnxruntime
session of the wheel's graph with float activations (each MatMulInteger replaced by a float
MatMul of its dequantised weight), to check the conversion apart from activation quantisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from petlkit.backbones.clip_onnx import dequantized, onnx_path

CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def photos() -> tuple[tuple[str, ...], torch.Tensor]:
    """scikit-image's sample photos, 224 px bicubic, CLIP mean/std."""
    import skimage.data

    images = []
    for name in PHOTOS:
        image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 255
        image = F.interpolate(image[None], size=(224, 224), mode="bicubic", align_corners=False)
        images.append(image)
    pixels = torch.cat(images)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return PHOTOS, (pixels - mean) / std


def float_activation_session():
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_path()))
    graph = model.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumer = {}
    for node in graph.node:
        for name in node.input:
            consumer.setdefault(name, node)
    replaced, dropped, weights = {}, set(), []
    for node in graph.node:
        if node.op_type != "MatMulInteger":
            continue
        stem = node.input[1].removesuffix("_quantized")
        weights.append(numpy_helper.from_array(dequantized(arrays, node.input[1]), f"{stem}_float"))
        cast = consumer[node.output[0]]
        scale = consumer[cast.output[0]]
        activation = producer[node.input[0]].input[0]
        replaced[id(scale)] = helper.make_node("MatMul", [activation, f"{stem}_float"],
                                               [scale.output[0]])  # fmt: skip
        dropped |= {id(node), id(cast)}
    nodes = [replaced.get(id(n), n) for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(weights)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the unused int8 initializers are removed, with a warning each
    return ort.InferenceSession(model.SerializeToString(), options, ["CPUExecutionProvider"])
