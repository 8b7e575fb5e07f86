"""Figures: detections drawn on images, what each query slot predicts (paper Fig. 7), attention maps,
training curves. Every plotting function returns a `matplotlib.figure.Figure` built without pyplot,
so nothing needs a display; save it with `fig.savefig(path)`."""
from .attention import (AttentionResult, compute_attention, decoder_attention, default_points,
                        encoder_attention, plot_attention, plot_decoder_attention, plot_encoder_attention,
                        valid_feature_sizes)
from .curves import metric_series, plot_training_curves, read_metrics
from .draw import class_colour, draw_detections, text_colour
from .queries import (SlotPredictions, box_kinds, choose_slots, collect_slot_predictions, plot_query_slots,
                      plot_slot_usage, query_figure_data, save_query_figures, slot_usage)

__all__ = [
    "AttentionResult", "compute_attention", "decoder_attention", "default_points", "encoder_attention",
    "plot_attention", "plot_decoder_attention", "plot_encoder_attention", "valid_feature_sizes",
    "metric_series", "plot_training_curves", "read_metrics",
    "class_colour", "draw_detections", "text_colour",
    "SlotPredictions", "box_kinds", "choose_slots", "collect_slot_predictions", "plot_query_slots",
    "plot_slot_usage", "query_figure_data", "save_query_figures", "slot_usage",
]
