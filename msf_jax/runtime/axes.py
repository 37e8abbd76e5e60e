"""Logical axis names carried by every parameter, and the default rules mapping them to mesh axes.

Models annotate parameters with these names only (never with mesh axes); `sharding.py` turns them
into `PartitionSpec`s with a rule table (the config may override `DEFAULT_RULES`).
"""

# Logical axis names.
EMBED = "embed"  # model width D (token features)
MLP = "mlp"  # MLP hidden width (4D) and adaLN modulation outputs (6D, 2D)
HEADS = "heads"  # attention heads x head_dim (fused qkv output 3D, attention output input D)
PATCH = "patch"  # flattened patch features C*p*p (patch-embedding input)
FREQ = "freq"  # sinusoidal frequency features (timestep embedding input)
CLASSES = "classes"  # label-embedding table rows
OUT = "out"  # small output features (final projection p*p*C_out)
CONV_IN = "conv_in"  # conv input channels (VAE, Inception)
CONV_OUT = "conv_out"  # conv output channels (VAE, Inception)
NORM = "norm"  # norm scales/biases

# Mesh axes.
DATA = "data"
FSDP = "fsdp"
TENSOR = "tensor"
MESH_AXES = (DATA, FSDP, TENSOR)

# Logical axis -> mesh axis (or None: replicated). FSDP shards the model width, tensor parallelism
# shards the MLP / heads dimension (Megatron-style). Batch is sharded over (data, fsdp).
DEFAULT_RULES = (
    (EMBED, FSDP),
    (MLP, TENSOR),
    (HEADS, TENSOR),
    (PATCH, None),
    (FREQ, None),
    (CLASSES, None),
    (OUT, None),
    (CONV_IN, None),
    (CONV_OUT, None),
    (NORM, None),
)
BATCH_AXES = (DATA, FSDP)
