"""Ray Serve wrappers around the StreamRec serving stages (thin), and the app builder.

* :mod:`deployments.app`: the deployments and ``build_app(args)``, the ``import_path`` of the
  Serve configs in ``configs/serve/``;
* :mod:`deployments.runtime`: the plain-Python glue they share (arguments, stages factory, funnel
  with fallback, gateway wiring); no Ray imports;
* :mod:`deployments.config`: load, override and deploy Serve config files from Python (what
  ``serve run <config>`` does), used by the CLI, the tests and the benchmark;
* :mod:`deployments.noop`: no-op stages, the benchmark floor of a composition.
"""
