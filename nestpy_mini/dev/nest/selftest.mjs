// Self-test: Nest client.mjs <-> Nest server.mjs.
//   node selftest.mjs                                  (TCP on an ephemeral port)
//   node selftest.mjs --transport nats --url nats://127.0.0.1:4222   (any switch of server.mjs)
// exit 0 = all checks passed
import { spawn } from 'child_process';
import { createInterface } from 'readline';
import { deepStrictEqual } from 'assert';
import { fileURLToPath } from 'url';
import { dirname, join } from 'path';

const here = dirname(fileURLToPath(import.meta.url));

function firstLine(child) {
  return new Promise((resolve, reject) => {
    const rl = createInterface({ input: child.stdout });
    rl.once('line', line => resolve({ line, rl }));
    child.once('exit', code => reject(new Error(`exited early with ${code}`)));
  });
}

const extra = process.argv.slice(2);
const isTcp = !extra.length || extra.join(' ').includes('--transport tcp');
const serverArgs = isTcp ? ['--transport', 'tcp', '--host', '127.0.0.1', '--port', '0'] : extra;
const server = spawn(process.execPath, [join(here, 'server.mjs'), ...serverArgs], { stdio: ['pipe', 'pipe', 'inherit'] });
const { line: ready } = await firstLine(server);
const port = Number(/^READY (\d+)$/.exec(ready)[1]);
const clientArgs = isTcp ? ['--transport', 'tcp', '--host', '127.0.0.1', '--port', String(port)] : extra;

const client = spawn(process.execPath, [join(here, 'client.mjs'), ...clientArgs], { stdio: ['pipe', 'pipe', 'inherit'] });
const { line: cready, rl } = await firstLine(client);
deepStrictEqual(cready, 'READY');

const answers = new Map();
rl.on('line', line => {
  const a = JSON.parse(line);
  answers.set(a.tag, a);
});

const commands = [
  { tag: 'sum', op: 'send', pattern: { cmd: 'sum' }, data: [1, 2, 3] },
  { tag: 'ping', op: 'send', pattern: 'ping', data: '' },
  { tag: 'stream', op: 'send', pattern: { cmd: 'stream' }, data: 3 },
  { tag: 'stream_err', op: 'send', pattern: { cmd: 'stream_err' }, data: 0 },
  { tag: 'rpc_str', op: 'send', pattern: { cmd: 'rpc_str' }, data: 0 },
  { tag: 'rpc_obj', op: 'send', pattern: { cmd: 'rpc_obj' }, data: 0 },
  { tag: 'boom', op: 'send', pattern: { cmd: 'boom' }, data: 0 },
  // Brokers never deliver a request nobody subscribed to (the client would wait forever).
  ...(isTcp ? [{ tag: 'unknown', op: 'send', pattern: { cmd: 'nope' }, data: 0 }] : []),
  { tag: 'mixed', op: 'send', pattern: { a9: 'y', B2: 'b', alpha: 'a', _under: 'u', Zeta_1: 'z', a10: 'x' }, data: 0 },
  { tag: 'ctx', op: 'send', pattern: { cmd: 'ctx' }, data: 0 },
  { tag: 'utf', op: 'send', pattern: { cmd: 'echo' }, data: { 名字: '张三 😀' } },
  { tag: 'many', op: 'send_many', pattern: { cmd: 'async_sum' }, datas: [[1], [1, 2], [1, 2, 3], [10, 20]] },
  { tag: 'ev', op: 'emit', pattern: 'user_created', data: { id: 7 } },
];
for (const c of commands) client.stdin.write(JSON.stringify(c) + '\n');
await new Promise(r => setTimeout(r, 300));
client.stdin.write(JSON.stringify({ tag: 'events', op: 'send', pattern: { cmd: 'events' }, data: 0 }) + '\n');
client.stdin.end();
const code = await new Promise(r => client.once('exit', r));
server.stdin.end();
await new Promise(r => server.once('exit', r));

const expect = {
  sum: { tag: 'sum', values: [6], error: null },
  ping: { tag: 'ping', values: ['pong'], error: null },
  stream: { tag: 'stream', values: [1, 2, 3], error: null },
  stream_err: { tag: 'stream_err', values: [1], error: { status: 'error', message: 'mid-stream' } },
  rpc_str: { tag: 'rpc_str', values: [], error: { status: 'error', message: 'bad thing' } },
  rpc_obj: { tag: 'rpc_obj', values: [], error: { code: 42, message: 'custom' } },
  boom: { tag: 'boom', values: [], error: { status: 'error', message: 'Internal server error' } },
  ...(isTcp ? { unknown: { tag: 'unknown', values: [], error: 'There is no matching message handler defined in the remote service.' } } : {}),
  mixed: { tag: 'mixed', values: ['mixed'], error: null },
  ctx: { tag: 'ctx', values: ['{"cmd":"ctx"}'], error: null },
  utf: { tag: 'utf', values: [{ 名字: '张三 😀' }], error: null },
  many: { tag: 'many', results: [1, 3, 6, 30], errors: [null, null, null, null] },
  ev: { tag: 'ev', ok: true },
  events: { tag: 'events', values: [[{ id: 7 }, { second: { id: 7 } }]], error: null },
};
let failed = 0;
for (const [tag, want] of Object.entries(expect)) {
  try {
    deepStrictEqual(answers.get(tag), want);
    console.log(`ok   ${tag} ${JSON.stringify(answers.get(tag))}`);
  } catch {
    failed++;
    console.log(`FAIL ${tag} got ${JSON.stringify(answers.get(tag))} want ${JSON.stringify(want)}`);
  }
}
console.log(`client exit code ${code}, server exit code ${server.exitCode}`);
process.exit(failed || code || server.exitCode ? 1 : 0);
