"""Figures: detections drawn on images, what each query slot predicts (paper Fig. 7), attention maps,
training curves. Every plotting function returns a `matplotlib.figure.Figure` built without pyplot,
so nothing needs a display; save it with `fig.savefig(path)`."""

# name -> submodule; loaded on first use (PEP 562) so that `detrkit viz --help` needs no torch
from ..lazy import lazy_names

_LAZY = {
    **dict.fromkeys(("AttentionResult", "compute_attention", "decoder_attention", "default_points",
                     "encoder_attention", "plot_attention", "plot_decoder_attention", "plot_encoder_attention",
                     "valid_feature_sizes"), ".attention"),
    **dict.fromkeys(("metric_series", "plot_training_curves", "read_metrics"), ".curves"),
    **dict.fromkeys(("class_colour", "draw_detections", "text_colour"), ".draw"),
    **dict.fromkeys(("SlotPredictions", "box_kinds", "choose_slots", "collect_slot_predictions", "plot_query_slots",
                     "plot_slot_usage", "query_figure_data", "save_query_figures", "slot_usage"), ".queries"),
    **dict.fromkeys(("confusion_matrix", "plot_confusion_matrix", "plot_label_statistics", "plot_pr_curves",
                     "prediction_mosaic", "write_eval_plots", "write_results_csv"), ".plots"),
}
__all__ = sorted(_LAZY)


__getattr__ = lazy_names(__name__, _LAZY, globals())
