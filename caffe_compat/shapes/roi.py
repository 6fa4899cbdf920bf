"""Shape rules of the two-stage detectors' layers: ROIPooling, PSROIPooling, and the
proposal layer py-faster-rcnn writes as a Python layer."""
from __future__ import annotations

from ..params.roi import (PROPOSAL_LAYER, proposal_settings, proposal_tops, psroi_pooling_settings,
                          psroi_pooling_top, roi_pooling_settings, roi_pooling_top)
from .base import rule


@rule("ROIPooling")
def _roi_pooling(v):
    return [roi_pooling_top(v, roi_pooling_settings(v))], []


@rule("PSROIPooling")
def _psroi_pooling(v):
    return [psroi_pooling_top(v, psroi_pooling_settings(v))], []


@rule(f"Python:{PROPOSAL_LAYER}")
def _proposal(v):
    proposal_settings(v, "TEST")  # the phase picks cfg's numbers, which no shape depends on
    # its setup says one roi; forward gives one row per proposal kept
    return proposal_tops(v), []
