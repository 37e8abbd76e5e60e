"""What every job runs on: the path layer (paths), multi-host start-up (distributed), the mesh and
logical-axis rules (sharding, axes), checkpoints, sample writers (outputs), the progress line, the
compilation cache and figures. Runtime imports neither the method nor the jobs.
"""
