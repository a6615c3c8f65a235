// Real NestJS 12 ClientProxy driven by JSON lines on stdin.
//
//   node client.mjs --transport tcp --host 127.0.0.1 --port N
//   (same --transport/--host/--port/--url/--queue switches as server.mjs)
//   On Kafka, Nest's client must call subscribeToResponseOf(pattern) before
//   connect() for every pattern it will send: --kafka-patterns p1,p2,... names
//   them (default: every pattern server.mjs answers on Kafka).
//
// After `await client.connect()` it prints "READY". Then each stdin line is a
// JSON command; each command gets exactly one JSON line on stdout, in
// completion order, carrying the command's "tag":
//   {"tag":T,"op":"send","pattern":P,"data":D}
//       -> {"tag":T,"values":[...every emitted value],"error":null|E}
//   {"tag":T,"op":"emit","pattern":P,"data":D}
//       -> {"tag":T,"ok":true}            (emit observable completed)
//       -> {"tag":T,"ok":false,"error":E} (emit observable errored)
//   {"tag":T,"op":"send_many","pattern":P,"datas":[D1,D2,...]}
//       -> {"tag":T,"results":[last value of each],"errors":[null|E,...]}
// E is the value the observable errored with, as-is; an Error instance is
// printed as {"message":..,"name":..}. Commands run concurrently. On stdin EOF
// the client waits for outstanding commands, closes and exits 0.
import 'reflect-metadata';
import { Logger } from '@nestjs/common';
import { ClientProxyFactory } from '@nestjs/microservices';
import { lastValueFrom } from 'rxjs';
import { createInterface } from 'readline';
import {
  buildTransportOptions,
  firstFetch,
  KAFKA_REPLY_PATTERNS,
  parseArgs,
  StderrLogger,
} from './common.mjs';

const args = parseArgs(process.argv.slice(2));
Logger.overrideLogger(new StderrLogger(args.verbose ? undefined : ['error', 'warn', 'fatal']));
const { transport, options, kind } = buildTransportOptions(args);

const out = obj => process.stdout.write(JSON.stringify(obj) + '\n');

const errorValue = err =>
  err instanceof Error ? { message: err.message, name: err.name } : err === undefined ? null : err;

function collect(observable) {
  return new Promise(resolve => {
    const values = [];
    observable.subscribe({
      next: value => values.push(value === undefined ? null : value),
      error: err => resolve({ values, error: errorValue(err) }),
      complete: () => resolve({ values, error: null }),
    });
  });
}

async function runCommand(client, cmd) {
  const tag = cmd.tag ?? null;
  switch (cmd.op) {
    case 'send': {
      const { values, error } = await collect(client.send(cmd.pattern, cmd.data));
      return { tag, values, error };
    }
    case 'emit': {
      const { error } = await collect(client.emit(cmd.pattern, cmd.data));
      return error === null ? { tag, ok: true } : { tag, ok: false, error };
    }
    case 'send_many': {
      const datas = Array.isArray(cmd.datas) ? cmd.datas : [];
      const settled = await Promise.allSettled(
        datas.map(data => lastValueFrom(client.send(cmd.pattern, data))),
      );
      return {
        tag,
        results: settled.map(s => (s.status === 'fulfilled' ? (s.value ?? null) : null)),
        errors: settled.map(s => (s.status === 'rejected' ? errorValue(s.reason) : null)),
      };
    }
    default:
      return { tag, error: { message: `unknown op: ${cmd.op}`, name: 'HarnessError' } };
  }
}

async function start() {
  const client = ClientProxyFactory.create({ transport, options });
  if (kind === 'kafka') {
    const patterns = args['kafka-patterns']
      ? String(args['kafka-patterns']).split(',')
      : KAFKA_REPLY_PATTERNS;
    for (const pattern of patterns) {
      client.subscribeToResponseOf(pattern);
    }
  }
  await client.connect();
  if (kind === 'kafka') {
    await firstFetch(client.consumer);  // its reply topics' offsets are set
  }
  process.stdout.write('READY\n');

  const pending = new Set();
  const rl = createInterface({ input: process.stdin, crlfDelay: Infinity });
  rl.on('line', line => {
    if (!line.trim()) {
      return;
    }
    let cmd;
    try {
      cmd = JSON.parse(line);
    } catch (err) {
      out({ tag: null, error: { message: `invalid command JSON: ${err.message}`, name: 'HarnessError' } });
      return;
    }
    const job = runCommand(client, cmd)
      .catch(err => ({ tag: cmd?.tag ?? null, error: errorValue(err) }))
      .then(answer => out(answer))
      .finally(() => pending.delete(job));
    pending.add(job);
  });
  rl.on('close', async () => {
    while (pending.size > 0) {
      await Promise.allSettled([...pending]);
    }
    try {
      await client.close();
    } catch (err) {
      process.stderr.write(`[client] close error: ${err?.stack || err}\n`);
    }
    process.stdout.write('', () => process.exit(0));
  });
}

start().catch(err => {
  process.stderr.write(`[client] fatal: ${err?.stack || err}\n`);
  process.exit(1);
});
