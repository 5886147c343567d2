"""Ray Serve wrappers around the StreamRec serving stages (thin), and the app builder.

* :mod:`deployments.app`: the deployments and ``build_app(args)``, the ``import_path`` of the
  Serve configs in ``configs/serve/``;
* the service logic they wrap (arguments, loading, the degradation policy, stage runners, hot
  reload, gateway wiring) lives in :mod:`streamrec.service`;
* :mod:`deployments.config`: load, override and deploy Serve config files from Python (what
  ``serve run <config>`` does), used by the CLI, the tests and the benchmark;
"""
