"""Data and encoders: training data sources (`datasets`: digits, image folders, shards; `captioned_images`;
`shard_writer`), Stable Diffusion's VAE and text encoders in PyTorch (`encoders`, torch imported lazily),
where a teacher's files are (`teacher_folder`, pure), and the data error (`data_error`). Importing this
package loads nothing.
"""
