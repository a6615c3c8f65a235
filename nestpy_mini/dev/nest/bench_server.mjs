// Lean NestJS 12 microservice for `python -m nestpy_mini.bench`: only the
// {cmd:'sum'} handler, so its memory is comparable with the one-handler
// nestpy_mini module the benchmark serves on the Python side.
//
//   node bench_server.mjs --transport tcp --host 127.0.0.1 --port 0
//   node bench_server.mjs --transport redis --url redis://127.0.0.1:6379
//   node bench_server.mjs --transport nats  --url nats://127.0.0.1:4222
//   node bench_server.mjs --transport kafka --url 127.0.0.1:9092 \
//        --pattern bench.sum.1.a --group bench-1.a   (Kafka: a topic, not an object)
//   (mqtt --url mqtt://...; rmq --url amqp://... --queue Q)
//
// stdout carries exactly one line, "READY <port>" (bound port for tcp, 0 for
// brokers). Log lines go to stderr. The process closes the app and exits 0
// on SIGTERM / SIGINT / end of stdin, so it cannot outlive its parent's pipe.
import 'reflect-metadata';
import { Controller, Module } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import { MessagePattern } from '@nestjs/microservices';
import {
  benchPattern,
  benchTransportOptions,
  listenAndAnnounce,
  parseArgs,
  StderrLogger,
} from './common.mjs';

const args = parseArgs(process.argv.slice(2));
const { transport, options, kind } = benchTransportOptions(args);

class BenchController {
  sum(data) {
    return (data || []).reduce((a, b) => a + b, 0);
  }
}

const proto = BenchController.prototype;
MessagePattern(benchPattern(args.pattern))(proto, 'sum', Object.getOwnPropertyDescriptor(proto, 'sum'));
Controller()(BenchController);

class BenchModule {}
Module({ controllers: [BenchController] })(BenchModule);

async function main() {
  const app = await NestFactory.createMicroservice(BenchModule, {
    transport,
    options,
    logger: new StderrLogger(['error', 'warn']),
  });

  let closing = null;
  const shutdown = () => {
    if (closing) {
      return closing;
    }
    setTimeout(() => process.exit(0), 3000).unref();
    closing = app
      .close()
      .catch(err => process.stderr.write(`[bench_server] close error: ${err?.stack || err}\n`))
      .finally(() => process.exit(0));
    return closing;
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();

  await listenAndAnnounce(app, kind);
}

main().catch(err => {
  process.stderr.write(`[bench_server] fatal: ${err?.stack || err}\n`);
  process.exit(1);
});
