'use strict';
// node-postgres through pgsage: prints one JSON object the pytest test checks.
//
// Usage: node node_check.js HOST PORT DBNAME
//
// Exercises: simple queries (one multi-statement Query message), parameterised queries (extended
// protocol, unnamed statement), a named prepared statement ({name, text}) run several times (one
// Parse, then Bind/Execute by name), a transaction with a rollback, and errors in both protocols
// after which the connection keeps working.

const { Client } = require('pg');

async function main() {
  const [host, port, database] = process.argv.slice(2);
  if (!database) {
    console.error('usage: node node_check.js HOST PORT DBNAME');
    process.exit(2);
  }
  const client = new Client({
    host,
    port: Number(port),
    database,
    user: 'postgres',
    application_name: 'pgsage-node-check',
  });
  await client.connect();
  const out = {};

  // simple protocol: no parameters, several statements in one Query message
  const multi = await client.query('select 1 as a; select 2 as b, 3 as c; select \'x\' as d /* node-simple */');
  out.simple = multi.map((r) => ({ command: r.command, rows: r.rows }));
  const one = await client.query('select version() like \'PostgreSQL%\' as ok');
  out.simple_single = one.rows[0].ok;

  // extended protocol: unnamed statement with parameters
  const params = await client.query(
    'select $1::int + $2::int as sum, $3::text as txt, $4::jsonb as doc /* node-params */',
    [2, 40, 'hello', JSON.stringify({ k: [1, 2] })],
  );
  out.params = params.rows[0];
  const series = await client.query(
    'select g from generate_series(1, $1::int) g /* node-series */',
    [25],
  );
  out.series_count = series.rowCount;
  out.series_sum = series.rows.reduce((acc, r) => acc + r.g, 0);

  // a named prepared statement, run several times: Parse once, then Bind/Execute by name
  out.named = [];
  for (let i = 1; i <= 6; i++) {
    const r = await client.query({
      name: 'pgsage_node_named',
      text: 'select $1::int * 2 as doubled, repeat($2::text, $1::int) as rep /* node-named */',
      values: [i, 'ab'],
    });
    out.named.push(r.rows[0]);
  }

  // a transaction: rows visible inside, gone after ROLLBACK; a committed one stays
  await client.query('create temp table node_tx (id int primary key, v text)');
  await client.query('begin');
  await client.query('insert into node_tx values ($1, $2), ($3, $4)', [1, 'one', 2, 'two']);
  out.tx_inside = (await client.query('select count(*)::int as n from node_tx')).rows[0].n;
  await client.query('rollback');
  out.tx_after_rollback = (await client.query('select count(*)::int as n from node_tx')).rows[0].n;
  await client.query('begin');
  const ins = await client.query('insert into node_tx values ($1, $2)', [3, 'three']);
  out.tx_insert_rowcount = ins.rowCount;
  await client.query('commit');
  out.tx_after_commit = (await client.query('select count(*)::int as n from node_tx')).rows[0].n;

  // errors: simple protocol, extended protocol, and inside a transaction
  out.errors = [];
  for (const q of [
    { text: 'select 1/0 /* node-error-simple */' },
    { text: 'select $1::int / 0 /* node-error-extended */', values: [7] },
    { text: 'select * from no_such_table_pgsage' },
  ]) {
    try {
      await client.query(q);
      out.errors.push(null);
    } catch (e) {
      out.errors.push({ code: e.code, message: e.message });
    }
  }
  await client.query('begin');
  try {
    await client.query('insert into node_tx values ($1, $2)', [3, 'duplicate']);
  } catch (e) {
    out.tx_error = e.code;
  }
  try {
    await client.query('select 1');
  } catch (e) {
    out.tx_aborted = e.code;
  }
  await client.query('rollback');
  out.after_errors = (await client.query('select $1::text as ok', ['still alive'])).rows[0].ok;

  await client.end();
  console.log(JSON.stringify(out));
}

main().catch((e) => {
  console.error(e && e.stack ? e.stack : e);
  process.exit(1);
});
