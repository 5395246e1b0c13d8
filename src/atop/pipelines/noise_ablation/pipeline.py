"""Wiring of the noise ablations (full comparison only).

For each ablation of :data:`ABLATIONS`: ``train_set``, ``test_set``, ``monitor_indices`` ->
``train_purifier_<name>`` -> ``purifier_<name>``, ``purifier_history_<name>``; its metrics
as the main purifier's (``evaluate_purifier_<name>``: PSNR and the AP clean accuracy on the
held-out images -> ``purifier_metrics_<name>``); then AToP (the ``atop`` arm of
``atop_finetuning``) on it -> ``purifier_atop_<name>``. The comparison evaluates both
(``ap_<name>``, ``atop_<name>``).
"""

from __future__ import annotations

from kedro.pipeline import Node, Pipeline

from atop.pipelines.atop_finetuning.pipeline import arm_nodes
from atop.pipelines.noise_ablation.nodes import ablation_node
from atop.pipelines.purifier_pretraining.nodes import evaluate_purifier

#: The ablations (their transforms: noise_ablation.ablations): sigma 0.25 at 32 px, and the
#: other route of the authors' noise. A name is part of the node and file names. The same
#: as ``atop.evaluation.defenses.NOISE_ABLATIONS`` (a test says so), spelled out here so
#: that the stage's code stays out of the evaluation package (its DVC dependencies).
ABLATIONS = ("sigma025", "upsample")


def create_pipeline(**kwargs) -> Pipeline:
    """The ``noise_ablation`` pipeline (pretraining + AToP per ablation)."""
    nodes = []
    for name in ABLATIONS:
        nodes.append(
            Node(
                ablation_node(name),
                inputs=[
                    "train_set",
                    "test_set",
                    "monitor_indices",
                    "params:purifier_pretraining",
                    "params:noise_ablation",
                ],
                outputs=[f"purifier_history_{name}", f"purifier_{name}"],
                name=f"train_purifier_{name}",
            )
        )
        nodes.append(
            Node(
                evaluate_purifier,
                inputs=[
                    f"purifier_{name}",
                    "classifier",
                    "test_set",
                    "eval_indices",
                    f"purifier_history_{name}",
                    "params:purifier_pretraining",
                ],
                outputs=[f"purifier_metrics_{name}", f"purifier_samples_{name}"],
                name=f"evaluate_purifier_{name}",
            )
        )
        nodes += arm_nodes(("atop",), purifier=f"purifier_{name}", suffix=f"_{name}")
    return Pipeline(nodes)
