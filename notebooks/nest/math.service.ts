// The chapter's math service (sections 2.2, 3.1 and 3.2) as a NestJS 12 app.
// Notebook 05c compiles it with tsc (tsconfig.json, beside this file) and runs it:
//
//   node math.service.js tcp 3001                      (TCP, on port 3001)
//   node math.service.js nats nats://127.0.0.1:4222    (NATS, through that broker)
//
// It prints "ready" once it serves, then whatever its handlers print.
import 'reflect-metadata';
import { Controller, Injectable, Module } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import {
  EventPattern,
  MessagePattern,
  MicroserviceOptions,
  Transport,
} from '@nestjs/microservices';

// #region controller
@Injectable()
export class MathService {
  sum(data: number[]): number {
    return (data || []).reduce((a, b) => a + b, 0);
  }
}

@Controller()
export class AppController {
  constructor(private readonly math: MathService) {}

  @MessagePattern({ cmd: 'sum' })
  sum(data: number[]): number {
    return this.math.sum(data);
  }

  @EventPattern('user_created')
  handleUserCreated(data: { userId: string }) {
    console.log('User created', data.userId);
  }
}

@Module({ controllers: [AppController], providers: [MathService] })
export class AppModule {}
// #endregion

// #region bootstrap
function transportFromArgs(): MicroserviceOptions {
  const [kind = 'tcp', where = '3001'] = process.argv.slice(2);
  if (kind === 'nats') {
    return { transport: Transport.NATS, options: { servers: [where] } };
  }
  return { transport: Transport.TCP, options: { host: '127.0.0.1', port: Number(where) } };
}

async function bootstrap() {
  const app = await NestFactory.createMicroservice<MicroserviceOptions>(AppModule, {
    ...transportFromArgs(),
    logger: ['error', 'fatal'], // errors only, on stderr: stdout is left to the handlers
  });
  app.enableShutdownHooks(); // SIGTERM and Ctrl-C close it gracefully
  process.stdin.on('end', () => app.close()).resume(); // and so does the end of stdin
  await app.listen();
  console.log('ready');
}
bootstrap();
// #endregion
