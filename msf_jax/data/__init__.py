"""Data layer (infrastructure): what training and evaluation read.

    input_pipeline  the public entry: create_train_iterator / create_eval_images for every source
    latent_cache    the latent-cache format (records, files, metadata) and its reader
    sources         random-access tfds / image-folder sources and per-example decoding
    iterators       generic grain assembly: shard, shuffle, batch valid examples, skip counts
    images          image decoding, ADM center crop, skip reasons; synthetic: the demo set
Writing the latent cache is a job of its own (`msf_jax.jobs.extract`).
"""
