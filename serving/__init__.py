"""espro's inference runtime: the complex bundle, the predictive math and the member engine.

Importing this package never imports Ray; only the Serve application module does.
"""

from importlib.metadata import version

__version__ = version("espro")
