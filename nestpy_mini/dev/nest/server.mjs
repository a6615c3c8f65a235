// Real NestJS 12 microservice used as the reference peer for nestpy_mini
// interop tests. Plain JavaScript: decorators are applied by calling them.
//
//   node server.mjs --transport tcp --host 127.0.0.1 --port 0
//   node server.mjs --transport redis --host 127.0.0.1 --port 6379
//   node server.mjs --transport redis --url redis://127.0.0.1:6379
//   node server.mjs --transport nats  --url nats://127.0.0.1:4222
//   node server.mjs --transport mqtt  --url mqtt://127.0.0.1:1883
//   node server.mjs --transport rmq   --url amqp://127.0.0.1:5672 --queue q
//   node server.mjs --transport kafka --url 127.0.0.1:9092 [--group G]
//
// On Kafka the {cmd: X} handlers answer the pattern 'cmd.X' and the mixed-key
// object pattern is not served: a Kafka topic name cannot hold '{', '"' or ':'.
//
// stdout carries exactly one line, "READY <port>" (bound port for tcp, 0 for
// brokers). Every Nest log line goes to stderr. The process closes the app and
// exits 0 on SIGTERM / SIGINT / end of stdin.
import 'reflect-metadata';
import { Controller, Module } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import {
  Ctx,
  EventPattern,
  MessagePattern,
  Payload,
  RpcException,
} from '@nestjs/microservices';
import { Observable, interval, map, take } from 'rxjs';
import {
  buildTransportOptions,
  commandPattern,
  listenAndAnnounce,
  parseArgs,
  StderrLogger,
} from './common.mjs';

const args = parseArgs(process.argv.slice(2));
const { transport, options, kind } = buildTransportOptions(args);

const sleep = ms => new Promise(resolve => setTimeout(resolve, ms));
const sumOf = data => (data || []).reduce((a, b) => a + b, 0);

// Events received so far (shared by both 'user_created' handlers).
const receivedEvents = [];

class AppController {
  sum(data) {
    return sumOf(data);
  }

  echo(data) {
    return data;
  }

  ping() {
    return 'pong';
  }

  nothing() {
    return undefined;
  }

  nullValue() {
    return null;
  }

  stream(n) {
    return interval(5).pipe(
      take(Number(n) || 0),
      map(i => i + 1),
    );
  }

  streamErr() {
    return new Observable(subscriber => {
      subscriber.next(1);
      const timer = setTimeout(
        () => subscriber.error(new RpcException('mid-stream')),
        5,
      );
      return () => clearTimeout(timer);
    });
  }

  rpcStr() {
    throw new RpcException('bad thing');
  }

  rpcObj() {
    throw new RpcException({ code: 42, message: 'custom' });
  }

  boom() {
    throw new Error('secret detail');
  }

  async asyncSum(data) {
    await sleep(1 + Math.floor(Math.random() * 10));
    return sumOf(data);
  }

  mixed() {
    return 'mixed';
  }

  ctx(data, ctx) {
    // TcpContext/RmqContext: getPattern; Redis: getChannel; NATS: getSubject; MQTT: getTopic.
    const getter = ctx.getPattern ?? ctx.getChannel ?? ctx.getSubject ?? ctx.getTopic;
    return getter.call(ctx);
  }

  userCreated(data) {
    receivedEvents.push(data);
  }

  userCreatedSecond(data) {
    receivedEvents.push({ second: data });
  }

  events() {
    return receivedEvents;
  }
}

const proto = AppController.prototype;
const decorate = (decorator, name) =>
  decorator(proto, name, Object.getOwnPropertyDescriptor(proto, name));

const cmd = name => commandPattern(kind, name);
decorate(MessagePattern(cmd('sum')), 'sum');
decorate(MessagePattern(cmd('echo')), 'echo');
decorate(MessagePattern('ping'), 'ping');
decorate(MessagePattern(cmd('nothing')), 'nothing');
decorate(MessagePattern(cmd('stream')), 'stream');
decorate(MessagePattern(cmd('stream_err')), 'streamErr');
decorate(MessagePattern(cmd('rpc_str')), 'rpcStr');
decorate(MessagePattern(cmd('rpc_obj')), 'rpcObj');
decorate(MessagePattern(cmd('boom')), 'boom');
decorate(MessagePattern(cmd('async_sum')), 'asyncSum');
if (kind !== 'kafka') {
  decorate(
    MessagePattern({ Zeta_1: 'z', alpha: 'a', _under: 'u', B2: 'b', a10: 'x', a9: 'y' }),
    'mixed',
  );
}
decorate(MessagePattern(cmd('ctx')), 'ctx');
if (kind === 'kafka') {
  // Kafka: null (as `nothing`'s undefined) goes out as one reply record with no value.
  decorate(MessagePattern(cmd('null')), 'nullValue');
}
// Parameter decorators: (target, propertyKey, parameterIndex).
Payload()(proto, 'ctx', 0);
Ctx()(proto, 'ctx', 1);
decorate(EventPattern('user_created'), 'userCreated');
decorate(EventPattern('user_created'), 'userCreatedSecond');
decorate(MessagePattern(cmd('events')), 'events');
Controller()(AppController);

class AppModule {}
Module({ controllers: [AppController] })(AppModule);

async function main() {
  const app = await NestFactory.createMicroservice(AppModule, {
    transport,
    options,
    logger: new StderrLogger(args.verbose ? undefined : ['error', 'warn']),
  });

  let closing = null;
  const shutdown = reason => {
    if (closing) {
      return closing;
    }
    process.stderr.write(`[server] shutting down (${reason})\n`);
    const hardExit = setTimeout(() => process.exit(0), 3000);
    hardExit.unref();
    closing = app
      .close()
      .catch(err => process.stderr.write(`[server] close error: ${err?.stack || err}\n`))
      .finally(() => process.exit(0));
    return closing;
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();

  await listenAndAnnounce(app, kind);
}

main().catch(err => {
  process.stderr.write(`[server] fatal: ${err?.stack || err}\n`);
  process.exit(1);
});
