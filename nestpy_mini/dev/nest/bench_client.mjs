// NestJS 12 ClientProxy side of `python -m nestpy_mini.bench`. It runs the
// very same phases as `python -m nestpy_mini.bench client`, so the two
// clients are measured alike:
//
//   node bench_client.mjs --transport tcp --host 127.0.0.1 --port N \
//        --requests 20000 --concurrency 100 --latency 2000 --warmup 2000
//   (--url redis://... or nats://... for the brokers, as in server.mjs;
//    --pattern P names the handler: a topic name on Kafka, with --group G)
//
// 1. ready:      one request at a time until one is answered (a broker server
//                may not have subscribed yet; a lost request is retried);
// 2. warm-up:    `warmup` requests with `concurrency` in flight, then a tenth
//                of them sequentially;
// 3. throughput: `requests` requests, `concurrency` in flight, over this one
//                ClientProxy (one connection for TCP);
// 4. latency:    `latency` sequential requests, each timed.
//
// stdout carries exactly one JSON line; the samples are raw nanoseconds so
// the orchestrator computes every percentile with one method. A watchdog
// (--deadline seconds) ends the process even if its parent is gone.
import 'reflect-metadata';
import { Logger } from '@nestjs/common';
import { ClientProxyFactory } from '@nestjs/microservices';
import { lastValueFrom, timeout } from 'rxjs';
import { benchPattern, benchTransportOptions, parseArgs, StderrLogger } from './common.mjs';

const args = parseArgs(process.argv.slice(2));
Logger.overrideLogger(new StderrLogger(['error', 'warn', 'fatal']));
const { transport, options, kind } = benchTransportOptions(args);

const PATTERN = benchPattern(args.pattern);
const DATA = [1, 2, 3];
// Kafka carries the number back as its text, and Nest's KafkaParser leaves it so.
const EXPECTED = kind === 'kafka' ? '6' : 6;
const requests = Number(args.requests ?? 20000);
const concurrency = Number(args.concurrency ?? 100);
const latencyCount = Number(args.latency ?? 2000);
const warmup = Number(args.warmup ?? 2000);
const readyTimeoutMs = Number(args['ready-timeout'] ?? 20) * 1000;
const deadlineMs = Number(args.deadline ?? 300) * 1000;

setTimeout(() => {
  process.stderr.write(`[bench_client] deadline of ${deadlineMs / 1000} s passed\n`);
  process.exit(3);
}, deadlineMs).unref();

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
const call = () => lastValueFrom(client.send(PATTERN, DATA));
// Replies counted by the phases below, not timed: a timeout per request would
// cost NestJS's side a timer each.
let answered = 0;

// Nest's clients wait for ever for a reply that never comes (its MQTT client can
// unsubscribe a reply topic while a request on it is still out).  Once the
// client is measuring, a stall of `stall` seconds ends the run with the reason,
// rather than at the deadline with none.
const stallMs = Number(args.stall ?? 10) * 1000;
function watchForStalls() {
  let seen = answered;
  setInterval(() => {
    if (answered === seen) {
      process.stderr.write(
        `[bench_client] no reply for ${stallMs / 1000} s after ${answered} answered: ` +
          `the server stopped answering, or NestJS's ${kind} client lost a reply\n`,
      );
      process.exit(4);
    }
    seen = answered;
  }, stallMs).unref();
}

const client = ClientProxyFactory.create({ transport, options });
if (kind === 'kafka') {
  client.subscribeToResponseOf(PATTERN); // Nest's Kafka client must know it before connect()
}

async function ready() {
  const end = Date.now() + readyTimeoutMs;
  for (;;) {
    try {
      return await lastValueFrom(client.send(PATTERN, DATA).pipe(timeout(1000)));
    } catch (err) {
      if (Date.now() > end) {
        throw new Error(`no reply within ${readyTimeoutMs / 1000} s: ${err?.message || err}`);
      }
      await sleep(50);
    }
  }
}

/** `total` requests with `inFlight` outstanding at every moment; returns [seconds, wrong replies]. */
async function pool(total, inFlight) {
  let remaining = total;
  let wrong = 0;
  const worker = async () => {
    while (remaining > 0) {
      remaining -= 1;
      const value = await call();
      answered += 1;
      if (value !== EXPECTED) {
        wrong += 1;
      }
    }
  };
  const start = process.hrtime.bigint();
  await Promise.all(Array.from({ length: inFlight }, worker));
  return [Number(process.hrtime.bigint() - start) / 1e9, wrong];
}

/** `count` sequential requests; returns [nanoseconds of each, wrong replies]. */
async function sequential(count) {
  const samples = [];
  let wrong = 0;
  for (let i = 0; i < count; i++) {
    const start = process.hrtime.bigint();
    const value = await call();
    samples.push(Number(process.hrtime.bigint() - start));
    answered += 1;
    if (value !== EXPECTED) {
      wrong += 1;
    }
  }
  return [samples, wrong];
}

async function main() {
  await client.connect();
  await ready();
  watchForStalls();
  await pool(warmup, concurrency);
  await sequential(Math.ceil(warmup / 10));
  const [elapsed, wrongPool] = await pool(requests, concurrency);
  const [samples, wrongSeq] = await sequential(latencyCount);
  const result = {
    impl: 'nest',
    transport: kind,
    requests,
    concurrency,
    warmup,
    elapsed_s: elapsed,
    throughput_rps: requests / elapsed,
    latency_ns: samples,
    errors: wrongPool + wrongSeq,
    client_peak_rss_mb: process.resourceUsage().maxRSS / 1024,
  };
  await client.close();
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(0));
}

main().catch(err => {
  process.stderr.write(`[bench_client] fatal: ${err?.stack || err}\n`);
  process.exit(1);
});
