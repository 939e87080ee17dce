"""The control plane's SQL, one module per table family, behind plain functions.

Every function takes a :data:`~go2cloud_server.repositories.db.Db` first: the database (a read
on a connection of its own) or the connection of an open transaction
(``Database.transaction()``; every write takes one). The service's concern modules
(``go2cloud_server.service``) hold no SQL: they call these. The statements are plain
parameterised SQL with ``?`` placeholders that SQLite and PostgreSQL both run as written
(``INSERT ... ON CONFLICT``, ordering by explicit columns such as ``seq``, never SQLite's rowid);
``db.one``/``db.all``/``db.execute`` are the only places that run a statement, and the database
turns the placeholders into its driver's style.

Rows are returned as plain dicts (column name -> value), JSON columns as stored (text): the
callers decode them (``store.loads``).
"""
