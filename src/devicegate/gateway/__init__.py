"""The gateway: devicegate in front of another server, and the ``devicegate serve`` app.

The core (the middleware, the token service) never imports this package; it builds on them:

    proxy.py          ReverseProxy: forwards admitted requests to an upstream (needs httpx)
    forward_auth.py   ForwardAuth: answers "may this request pass?" for nginx, Traefik, Caddy
    _policy.py        what the proxy passes on, as pure functions: headers, target, body
                      framing, redirects
    _request_line.py  the methods and raw paths neither of them passes on
    _refusals.py      the answers they give instead of the upstream's
    _app.py           build_app and ServeSettings: the app the command line serves
    _demo.py          the demo and health apps

Import ``ReverseProxy`` from :mod:`devicegate.gateway.proxy` and ``ForwardAuth`` from
:mod:`devicegate.gateway.forward_auth` (``devicegate.proxy`` and ``devicegate.forward_auth``
name them too). Nothing is imported here, so that the command line, which needs this package
without the ``server`` extra, never loads httpx.
"""
