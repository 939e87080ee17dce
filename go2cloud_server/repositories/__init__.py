"""The control plane's SQL, one module per table family, behind plain functions.

Every function takes a :data:`~go2cloud_server.repositories.db.Db` first: the ``Store`` (a read
on a connection of its own) or the ``sqlite3.Connection`` of an open transaction
(``Store.transaction()``; every write takes one). The service's concern modules
(``go2cloud_server.service``) hold no SQL: they call these. The statements are plain
parameterised SQL with ``?`` placeholders; a second database engine implements the same
functions (``db.one``/``db.all``/``db.execute`` are the only places that run a statement).

Rows are returned as plain dicts (column name -> value), JSON columns as stored (text): the
callers decode them (``store.loads``).
"""
