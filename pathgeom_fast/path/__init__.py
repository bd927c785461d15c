"""Measuring along an optimization path: ``geometry`` (RSI, EB, cos, eta* of one measurement),
``batches`` (the data a gradient is measured on) and ``tracker`` (``PathTracker``)."""
