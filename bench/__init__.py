"""The benchmark harness of Sellfern Webhooks (not tests): ``python -m bench --help``.

One run creates its own RabbitMQ vhost, PostgreSQL database and HTTPS receiver process,
runs the worker as a real ``python -m worker.cli worker`` process per scenario, prints one
table and writes ``bench/results/<time>.json``; everything it created is removed on exit,
also on Ctrl-C.
"""
