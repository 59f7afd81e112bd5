"""The model zoo: the paper's baseline CNN, MobileNetV2, framecast's optimized CNN, the
stream CNN (a tenth of the optimized CNN's MACs, for high frame rates on few cores), and the
camera CNN (RGB camera scenes at 224x224 and up, cheaper than MobileNetV2 0.35).

All models are Keras 2 (``tf_keras``) functional models that take float images in [0, 1],
NHWC, and end in a softmax over the classes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs.exceptions import OptionError
from jobs.names import MODEL_NAMES, validate_choice
from jobs.tf_env import keras

MOBILENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
MOBILENET_MIN_SIZE = 32
MOBILENET_IMAGENET_SIZE = 96


@dataclass(frozen=True)
class ModelSpec:
    """Which model to build and its options."""

    name: str
    alpha: float = 0.35
    weights: str = "none"  # none | imagenet | PATH (a .h5 / .weights.h5 weights file)


def _validate_model_spec(spec: ModelSpec) -> None:
    validate_choice("model", spec.name, MODEL_NAMES)
    if spec.name != "mobilenet_v2":
        if spec.weights != "none":
            raise OptionError(f"--weights is only for mobilenet_v2, not {spec.name}")
        return
    if spec.weights == "imagenet" and spec.alpha not in MOBILENET_ALPHAS:
        raise OptionError(f"imagenet weights exist only for alpha in {MOBILENET_ALPHAS}, "
                         f"got {spec.alpha}")
    if spec.alpha <= 0:
        raise OptionError(f"alpha must be > 0, got {spec.alpha}")
    if spec.weights not in ("none", "imagenet") and not Path(spec.weights).is_file():
        raise OptionError(f"--weights must be none, imagenet or an existing weights file; "
                         f"{spec.weights} does not exist")


def build_model(spec: ModelSpec, input_shape: tuple[int, int, int],
                num_classes: int) -> keras.Model:
    """Build an uncompiled model for input_shape (H, W, C) and num_classes."""
    _validate_model_spec(spec)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    builder = _BUILDERS.get(spec.name)
    if builder is not None:
        return builder(input_shape, num_classes)
    return mobilenet_v2(input_shape, num_classes, alpha=spec.alpha, weights=spec.weights)


def baseline_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The paper's CNN, read sanely (docs/paper.md): 4 convs, 2 pools, 2 dense + dropout 0.5."""
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    for index, filters in enumerate((32, 64, 128, 256)):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu",
                          name=f"conv{index + 1}")(x)
        if index % 2 == 1:
            x = layers.MaxPooling2D(2, name=f"pool{index // 2 + 1}")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dense(256, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.5, name="drop1")(x)
    x = layers.Dense(128, activation="relu", name="fc2")(x)
    x = layers.Dropout(0.5, name="drop2")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="baseline_cnn")


def optimized_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """framecast's CNN: narrow full-resolution convs, BatchNorm, a flat head; ~1/5 the MACs.

    The head flattens the last 7x7 map instead of averaging it away: where on the garment a
    feature sits (sleeve, collar, hem) separates shirts from T-shirts and coats, and the
    flat head costs 63 k MACs (0.3 %) more than global average pooling. The GAP head of the
    first shipped model underfit (train 93.0 % vs validation 92.6 % at epoch 16).
    """
    inputs = keras.Input(shape=input_shape, name="images")
    return _flat_head(inputs, _optimized_convs(inputs), num_classes, "optimized_cnn")


def optimized_fc(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """optimized_cnn's convs with a hidden-layer head as stream_fc's: flatten, a dense layer
    of 64 (ReLU), dropout, softmax; 18.58 M MACs (+339 k, 2 %), within issue 22's 20 M. The
    hidden layer gave stream_cnn +0.6 points at the same MACs (docs/training.md, "Stream
    architectures"). 64, not stream_fc's 128: at batch 1 the 6,272-input dense layer is a
    matrix-vector product, and with 128 units the int8 model took 12 % more CPU time per
    image than optimized_cnn (0.117 against 0.104 ms, XNNPACK, one thread); with 64 the same.
    """
    inputs = keras.Input(shape=input_shape, name="images")
    return _hidden_head(inputs, _optimized_convs(inputs), num_classes, "optimized_fc",
                        OPTIMIZED_FC_HIDDEN)


OPTIMIZED_FC_HIDDEN = 64


def optimized_fc128(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """optimized_fc with stream_fc's hidden layer of 128, paid for by a conv5 of 96 (not 128):
    17.88 M MACs, the same int8 batch-1 time as optimized_cnn (0.105 against 0.104 ms)."""
    inputs = keras.Input(shape=input_shape, name="images")
    return _hidden_head(inputs, _optimized_convs(inputs, conv5=96), num_classes,
                        "optimized_fc128", 128)


def _optimized_convs(inputs: Any, conv5: int = 128) -> Any:
    """16 -> 32 at full resolution, pool, 64 -> 64, pool, conv5 (all 3x3, BatchNorm, ReLU)."""
    layers = keras.layers
    x = _conv_bn(inputs, 16, "conv1")
    x = _conv_bn(x, 32, "conv2")
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = _conv_bn(x, 64, "conv3")
    x = _conv_bn(x, 64, "conv4")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    return _conv_bn(x, conv5, "conv5")


def _conv_bn(x: Any, filters: int, name: str, kernel: int = 3, strides: int = 1) -> Any:
    layers = keras.layers
    x = layers.Conv2D(
        filters, kernel, strides=strides, padding="same", use_bias=False, name=name
    )(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x)


def _flat_head(inputs: Any, x: Any, num_classes: int, name: str) -> keras.Model:
    """Flatten, dropout, softmax: where a feature sits on the garment is kept."""
    layers = keras.layers
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(0.3, name="drop")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def _hidden_head(inputs: Any, x: Any, num_classes: int, name: str, hidden: int) -> keras.Model:
    """Flatten, a dense layer of hidden units (ReLU), dropout, softmax."""
    layers = keras.layers
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(hidden, activation="relu", name="fc1")(x)
    x = layers.Dropout(0.3, name="drop")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name=name)


def stream_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The stream CNN: a 2x2 stride-2 "patchify" stem (16 at 14x14), 32 at 14x14, pool,
    64 at 7x7, flatten: ~1.85 M MACs (a tenth), for streams of thousands of frames per second
    on a few cores, where the int8 optimized_cnn would need every core for inference alone.

    The stem replaces a 3x3 conv of 16 at full resolution and a pool, which in XNNPACK int8
    took nearly twice the time per image (docs/BENCHMARKS.md, "Figures behind choices in the
    code").
    """
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn(inputs, 16, "stem", kernel=2, strides=2)
    x = _conv_bn(x, 32, "conv2")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = _conv_bn(x, 64, "conv3")
    return _flat_head(inputs, x, num_classes, "stream_cnn")


def stream_sep(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """stream_cnn's 14x14 part (the 2x2 stride-2 stem, a 3x3 conv of 32, pool), then the
    7x7 stage made deeper and wider for fewer MACs: a depthwise-separable block to 80
    channels and two residual separable blocks instead of one 3x3 conv of 64, and the flat
    head. ~1.71 M MACs.

    A full 3x3 conv of c -> c' costs 9 c c' per position, a separable block 9 c + c c'; but
    in XNNPACK int8 a depthwise/1x1 MAC costs about twice a 3x3 conv's, so only the 7x7
    stage is separable (docs/training.md, "Stream architectures").
    """
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn(inputs, 16, "stem", kernel=2, strides=2)
    x = _conv_bn(x, 32, "conv2")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = _separable_blocks(x, STREAM_SEP_BLOCKS)
    return _flat_head(inputs, x, num_classes, "stream_sep")


# stream_sep's 7x7 stage: (output channels, stride) of each block (residual where the shape
# allows).
STREAM_SEP_BLOCKS = ((80, 1), (80, 1), (80, 1))


def stream_dw(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """The 2x2 stride-2 stem, a strided 3x3 conv of 64 straight into 7x7 (no 3x3 work at
    14x14), a separable block to 96 channels and two residual separable blocks at 7x7, and
    the flat head: ~1.72 M MACs.
    """
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn(inputs, 16, "stem", kernel=2, strides=2)
    x = _conv_bn(x, 64, "conv2", strides=2)
    x = _separable_blocks(x, STREAM_DW_BLOCKS)
    return _flat_head(inputs, x, num_classes, "stream_dw")


# stream_dw's 7x7 stage, as STREAM_SEP_BLOCKS.
STREAM_DW_BLOCKS = ((96, 1), (96, 1), (96, 1))


def stream_fc(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """stream_cnn with a hidden fully-connected layer: the 2x2 stride-2 stem (16), a 3x3 conv
    of 32 at 14x14, pool, a 3x3 conv of 48 at 7x7 (stream_cnn: 64), then flatten, a dense
    layer of 128 (ReLU), dropout and the softmax: ~1.90 M MACs. The hidden layer combines
    features across positions (a sleeve here and a hem there) before the classes; it costs
    301 k MACs, paid for by the narrower conv3. Full convs and dense layers only: XNNPACK
    int8 runs them near its peak; depthwise-separable candidates of the same MACs ran 1.5-2x
    slower per image in int8 and were less accurate (docs/training.md, "Stream
    architectures"). 92.35 % int8 with --no-augment and the optimized model as teacher,
    15 epochs, pruned to 50 %; about stream_cnn's time per image.
    """
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn(inputs, 16, "stem", kernel=2, strides=2)
    x = _conv_bn(x, 32, "conv2")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = _conv_bn(x, STREAM_FC_CONV3, "conv3")
    return _hidden_head(inputs, x, num_classes, "stream_fc", STREAM_FC_HIDDEN)


STREAM_FC_CONV3 = 48
STREAM_FC_HIDDEN = 128


def stream_deep(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """stream_cnn one conv deeper at the same MACs, full convs only: the 2x2 stride-2 stem
    (16), a 3x3 conv of 24 at 14x14, pool, 3x3 convs of 40 and 48 at 7x7, the flat head:
    ~1.98 M MACs, ~1.15x stream_cnn's int8 time per image. 91.84 % int8 with the recipe
    that gave stream_fc 92.35 % (docs/training.md, "Stream architectures").
    """
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn(inputs, 16, "stem", kernel=2, strides=2)
    x = _conv_bn(x, 24, "conv2")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = _conv_bn(x, 40, "conv3")
    x = _conv_bn(x, 48, "conv4")
    return _flat_head(inputs, x, num_classes, "stream_deep")


def _separable_blocks(x: Any, blocks: tuple[tuple[int, int], ...]) -> Any:
    """Separable blocks, each (output channels, stride); residual where the shape stays."""
    for index, (filters, strides) in enumerate(blocks):
        name = f"block{index + 1}"
        if strides == 1 and int(x.shape[-1]) == filters:
            x = _separable_residual(x, name)
        else:
            x = _separable(x, filters, strides, name)
    return x


def _depthwise_bn_relu(x: Any, strides: int, name: str) -> Any:
    layers = keras.layers
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                               name=f"{name}_dw")(x)
    x = layers.BatchNormalization(momentum=0.9, name=f"{name}_dw_bn")(x)
    return layers.ReLU(name=f"{name}_dw_relu")(x)


def _separable(x: Any, filters: int, strides: int, name: str) -> Any:
    """3x3 depthwise, BN, ReLU, 1x1 conv, BN, ReLU."""
    x = _depthwise_bn_relu(x, strides, name)
    return _conv_bn(x, filters, f"{name}_pw", kernel=1)


def _separable_residual(x: Any, name: str) -> Any:
    """ReLU(x + BN(1x1(ReLU(BN(dw3x3(x)))))): the shape stays."""
    layers = keras.layers
    y = _depthwise_bn_relu(x, 1, name)
    y = layers.Conv2D(int(x.shape[-1]), 1, use_bias=False, name=f"{name}_pw")(y)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_pw_bn")(y)
    y = layers.Add(name=f"{name}_add")([x, y])
    return layers.ReLU(name=f"{name}_relu")(y)


def camera_cnn(input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """framecast's camera CNN for RGB scenes at 224x224 (any size that divides by 32).

    A 4x4 stride-4 "patchify" stem (space-to-depth and a 1x1 conv in one layer: 224 -> 56)
    takes the full-resolution work off the table, then six inverted-residual blocks
    (1x1 expand, 3x3 depthwise, linear 1x1 project; residual when the shape allows) at
    28, 14 and 7, a 1x1 conv to 256 and global average pooling (a garment can sit anywhere
    in a camera scene, so where a feature sits is not kept as in the flat heads). 57.5 M
    MACs and 329 k parameters at 224, about MobileNetV2 0.35's MACs and a fifth of 1.0's; in
    int8 LiteRT at batch 1 it ran in a seventh of 1.0's time (docs/training.md). Only
    layers that tfmot prunes (Conv2D, Dense) and quantizes (QAT), and that LiteRT runs in
    int8. (A first version, 24 / 32-64-96 / 256 wide, 28.9 M MACs, underfit: 64 % on the
    scenes validation split after 8 epochs, train accuracy the same.)
    """
    layers = keras.layers
    inputs = keras.Input(shape=input_shape, name="images")
    x = _conv_bn(inputs, CAMERA_STEM, "stem", kernel=4, strides=4)
    for index, (filters, expand, strides) in enumerate(CAMERA_BLOCKS):
        x = _inverted_residual(x, filters, expand, strides, f"block{index + 1}")
    x = _conv_bn(x, CAMERA_HEAD, "head", kernel=1)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    x = layers.Dropout(0.2, name="drop")(x)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="camera_cnn")


# camera_cnn's widths: the stem, (output channels, expansion, stride) of each
# inverted-residual block, the head conv.
CAMERA_STEM = 32
CAMERA_BLOCKS = ((48, 2, 2), (48, 3, 1), (96, 3, 2), (96, 3, 1), (128, 3, 2), (128, 3, 1))
CAMERA_HEAD = 320


def _inverted_residual(x: Any, filters: int, expand: int, strides: int, name: str) -> Any:
    layers = keras.layers
    channels = int(x.shape[-1])
    y = _conv_bn(x, channels * expand, f"{name}_expand", kernel=1)
    y = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False,
                               name=f"{name}_dw")(y)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_dw_bn")(y)
    y = layers.ReLU(name=f"{name}_dw_relu")(y)
    y = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(y)
    y = layers.BatchNormalization(momentum=0.9, name=f"{name}_project_bn")(y)
    if strides == 1 and channels == filters:
        y = layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilenet_v2(input_shape: tuple[int, int, int], num_classes: int, alpha: float = 0.35,
                 weights: str = "none") -> keras.Model:
    """Keras MobileNetV2 (flattened into one graph) on images resized to >= 32x32, 3 channels."""
    layers = keras.layers
    height, width, channels = input_shape
    minimum = MOBILENET_IMAGENET_SIZE if weights == "imagenet" else MOBILENET_MIN_SIZE
    size = (max(height, minimum), max(width, minimum))
    inputs = keras.Input(shape=input_shape, name="images")
    x = inputs
    if (height, width) != size:
        x = layers.Resizing(size[0], size[1], name="resize")(x)
    if channels == 1:
        x = layers.Concatenate(axis=-1, name="to_rgb")([x, x, x])
    elif channels != 3:
        raise ValueError(f"mobilenet_v2 needs 1 or 3 input channels, got {channels}")
    # MobileNetV2 expects inputs in [-1, 1].
    x = layers.Rescaling(2.0, offset=-1.0, name="to_signed")(x)
    base = keras.applications.MobileNetV2(
        input_tensor=x, input_shape=(size[0], size[1], 3), alpha=alpha, include_top=False,
        weights="imagenet" if weights == "imagenet" else None,
    )
    if weights != "imagenet":
        # Keras' MobileNetV2 keeps BatchNorm statistics with momentum 0.999, made for
        # fine-tuning ImageNet weights. From scratch the moving averages lag the weights for
        # thousands of steps and inference-mode accuracy stays at chance (10 % after 5
        # Fashion-MNIST epochs while training accuracy was 83 %); 0.9 follows them.
        for layer in base.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = 0.9
    y = layers.GlobalAveragePooling2D(name="gap")(base.output)
    y = layers.Dropout(0.2, name="drop")(y)
    outputs = layers.Dense(num_classes, activation="softmax", name="probabilities")(y)
    model = keras.Model(inputs, outputs, name="mobilenet_v2")
    if weights not in ("none", "imagenet"):
        _load_mobilenet_weights(model, base, weights, alpha)
    return model


def _load_mobilenet_weights(model: keras.Model, base: keras.Model, path: str,
                            alpha: float) -> None:
    """Load a weights file into the backbone (an ImageNet-style no-top checkpoint, as
    keras.applications publishes: ``mobilenet_v2_weights_..._no_top.h5``) or, failing that,
    into the whole model (a framecast mobilenet_v2 of the same classes and alpha).

    The convolutions do not depend on the input size, so a checkpoint made at 224 loads into
    a model at any --input-size. A file that fits neither is an OptionError naming --weights.
    """
    try:
        base.load_weights(path)
        return
    except (ValueError, OSError, KeyError):
        pass
    try:
        model.load_weights(path)
    except (ValueError, OSError, KeyError) as error:
        raise OptionError(
            f"--weights {path} fits neither mobilenet_v2 alpha {alpha}'s backbone (an "
            f"ImageNet-style no-top checkpoint) nor the whole model: {error}") from None


def count_macs(model: keras.Model) -> int:
    """Multiply-accumulates of one forward pass (Conv2D, DepthwiseConv2D, Dense layers)."""
    total = 0
    for layer in _leaf_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        out_shape = layer.output_shape
        if isinstance(out_shape, list):
            out_shape = out_shape[0]
        spatial = 1
        for dim in out_shape[1:-1]:
            spatial *= int(dim)
        kernel_size = 1
        for dim in kernel.shape:
            kernel_size *= int(dim)
        # Conv2D [kh, kw, cin, cout], DepthwiseConv2D [kh, kw, cin, mult], Dense [in, out]:
        # each kernel weight is used once per output position.
        total += spatial * kernel_size
    return total


def _leaf_layers(model: keras.Model) -> list[Any]:
    leaves: list[Any] = []
    for layer in model.layers:
        inner = getattr(layer, "layer", None)  # pruning wrappers
        if isinstance(layer, keras.Model):
            leaves += _leaf_layers(layer)
        elif inner is not None:
            leaves.append(inner)
        else:
            leaves.append(layer)
    return leaves


# The models built from (input shape, classes) alone; mobilenet_v2 also takes alpha and weights.
_BUILDERS: dict[str, Callable[[tuple[int, int, int], int], keras.Model]] = {
    "baseline_cnn": baseline_cnn, "optimized_cnn": optimized_cnn, "stream_cnn": stream_cnn,
    "stream_dw": stream_dw, "stream_sep": stream_sep, "stream_fc": stream_fc,
    "stream_deep": stream_deep, "camera_cnn": camera_cnn, "optimized_fc": optimized_fc,
    "optimized_fc128": optimized_fc128,
}
