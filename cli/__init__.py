"""sdrt.cli — the `sdrt` command, one module per command family, on top of the runtime (sdrt.engine) and the
application packages (sdrt.export, sdrt.serve, sdrt.benchmarks, sdrt.demo); the runtime knows none of them.

    main.py      the parser, dispatch, error lines and exit statuses
    generate.py  generate, img2img, inpaint, outpaint
    outputs.py   their PNG paths: checked before generating, written all or none
    signals.py   Ctrl-C and SIGTERM: generation in a worker thread, so the command stops at once
    build.py     export, build-engines, make-checkpoint, quantize
    serve.py     serve
    tools.py     bench, doctor, sweep
"""
