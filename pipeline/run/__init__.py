"""Running the stages: a cache's identity from a config, computing its shards' targets with the
teacher ensemble, the student jobs of a config, and fan-out over Dask (LocalCluster, an existing
scheduler, or Slurm through dask-jobqueue). Imports the layers below; never pipeline.tools or
stages/."""
