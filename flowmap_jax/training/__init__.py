"""The training run: configuration (`config` schema, `presets` deltas, `train_cli` command line), the parts
(`assembly`), the compiled step (`train_step`, `sharding`, `distributed`), what a run writes (`reporting`,
`grid_decoder`, `export_writer`), and its folder and record (`run_folder`, `run_lock`, `run_config_check`,
`checkpointing`, `run_record`, `rejected_checkpoints`, `run_provenance`). `flowmap_jax.train` tells the story
of a run with these. Importing this package loads nothing.
"""
