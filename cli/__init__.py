"""sdrt.cli — the `sdrt` command, one module per command family, on top of the runtime (sdrt.engine) and the
application packages (sdrt.export, sdrt.serve, sdrt.benchmarks, sdrt.demo); the runtime knows none of them.

    main.py      the parser, dispatch, error lines and exit statuses
    generate.py  generate, img2img, inpaint, outpaint
    build.py     export, build-engines, make-checkpoint, quantize
    serve.py     serve
    tools.py     bench, doctor, sweep
"""
