"""espro's offline trainer: modes, simplexes (SPRO/ESPRO), calibration and evaluation."""
