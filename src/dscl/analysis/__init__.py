"""What a trained model learned: the paper's analyses, plots of every run, TensorBoard scalars.

One module per analysis, each a library function on plain arguments plus the ``dscl analyze``
command that reads a run folder:

- :mod:`.gradients`: the gradient-norm ratio of the two kinds of positives per class (Fig. 2);
- :mod:`.retrieval`: patch-query retrieval with response maps (Fig. 1, 4);
- :mod:`.cam`: class activation maps of the stage-2 classifier;
- :mod:`.plots`: per-class accuracy and training curves of a run (written at the end of a run);

``dscl report`` (:mod:`dscl.report`) puts several runs side by side on one HTML page.
"""

from .cam import class_activation_maps
from .gradients import anchor_gradient_ratios, class_gradient_ratios
from .plots import curves_figure, per_class_figure, plot_run
from .retrieval import FeatureSpace, response_maps, retrieve

__all__ = [
    "FeatureSpace", "anchor_gradient_ratios", "class_activation_maps", "class_gradient_ratios", "curves_figure",
    "per_class_figure", "plot_run", "response_maps", "retrieve",
]
