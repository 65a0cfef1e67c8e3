"""Expert and data parallelism with Keras' own engine (`keras.distribution`).

A V-MoE / E³ outgrows one device through its experts: every MoE layer holds
E stacked expert MLPs ([E, H, mlp] and [E, mlp, H] kernels). `expert_parallel`
shards them along a mesh axis named "expert" and the batch along a "batch"
axis; everything else (attention, embeddings, routers, head) is replicated.
Routing needs no special code: the MoE layer's expert buffers [E, G*C, H]
are laid out along the same axes, and XLA's sharding propagation moves the
tokens between devices (the all-to-all of GShard/vmoe).

    import keras_e3
    from keras_e3 import distribution as e3_dist

    dist = e3_dist.expert_parallel(batch=2, expert=4)  # 8 devices
    with dist.scope():
        model = keras_e3.E3ViT.from_preset("e3_tiny_digits")
        model.compile(...)
    model.fit(...)

`data_parallel()` replicates the model (plain data parallelism). Both need
the JAX backend (Keras' ModelParallel); on TensorFlow, `tf_data_parallel()`
gives a `tf.distribute.MirroredStrategy`. For several hosts, call
`keras.distribution.initialize()` first on every host (see the README).
"""

from keras_e3.distribution.parallel import BATCH_AXIS
from keras_e3.distribution.parallel import EXPERT_AXIS
from keras_e3.distribution.parallel import check_num_experts
from keras_e3.distribution.parallel import data_parallel
from keras_e3.distribution.parallel import device_mesh
from keras_e3.distribution.parallel import expert_axis_size
from keras_e3.distribution.parallel import expert_layout_map
from keras_e3.distribution.parallel import expert_parallel
from keras_e3.distribution.parallel import parameter_bytes_per_device
from keras_e3.distribution.parallel import tf_data_parallel
from keras_e3.distribution.parallel import variable_shardings
