"""Data-parallel launch of the pipeline's training and evaluation nodes (README "Scaling out").

Two ways in, one code path inside (:mod:`atop.distributed`):

* from Kedro: :func:`~atop.pipelines.distributed_launch.launch.scale_out` (applied by
  ``atop.pipeline_registry``) lets the training nodes and the per-defense evaluation nodes
  read their stage's ``distributed`` block; with more than one process they start them with
  torchrun's elastic agent and return the first one's outputs to the catalog;
* from ``torchrun`` on a cluster: ``torchrun ... -m atop.pipelines.distributed_launch
  --pipeline <stage> --env <profile>`` runs a pipeline in every process
  (:mod:`~atop.pipelines.distributed_launch.__main__`), rank 0 saving the outputs.
"""
