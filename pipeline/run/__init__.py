"""Running the stages: a cache's identity from a config, the student jobs of a config, and fan-out
over Dask (LocalCluster, an existing scheduler, or Slurm through dask-jobqueue). Imports the
layers below; never pipeline.tools or stages/."""
