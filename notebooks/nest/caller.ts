// A NestJS app that calls the math service (the chapter's section 四), whichever
// language serves it. Notebook 05c compiles it with tsc and runs it:
//
//   node caller.js tcp 3001                      (TCP, to port 3001)
//   node caller.js nats nats://127.0.0.1:4222    (NATS, through that broker)
//
// It asks for the sum of [1, 2, 3], emits user_created, prints both, and exits.
import 'reflect-metadata';
import { Inject, Injectable, Module } from '@nestjs/common';
import { NestFactory } from '@nestjs/core';
import {
  ClientProviderOptions,
  ClientProxy,
  ClientsModule,
  Transport,
} from '@nestjs/microservices';
import { lastValueFrom } from 'rxjs';

// #region service
@Injectable()
export class AppService {
  constructor(@Inject('MATH_SERVICE') private client: ClientProxy) {}

  sum(arr: number[]) {
    return this.client.send<number>({ cmd: 'sum' }, arr);
  }

  userCreated(userId: string) {
    return this.client.emit('user_created', { userId });
  }
}
// #endregion

// #region module
function mathServiceFromArgs(): ClientProviderOptions {
  const [kind = 'tcp', where = '3001'] = process.argv.slice(2);
  if (kind === 'nats') {
    return { name: 'MATH_SERVICE', transport: Transport.NATS, options: { servers: [where] } };
  }
  const options = { host: '127.0.0.1', port: Number(where) };
  return { name: 'MATH_SERVICE', transport: Transport.TCP, options };
}

@Module({
  imports: [ClientsModule.register([mathServiceFromArgs()])],
  providers: [AppService],
})
export class CallerModule {}
// #endregion

// #region main
async function main() {
  const app = await NestFactory.createApplicationContext(CallerModule, {
    logger: ['error', 'fatal'],
  });
  const service = app.get(AppService);
  console.log('sum:', await lastValueFrom(service.sum([1, 2, 3])));
  await lastValueFrom(service.userCreated('42'));
  console.log('emitted user_created');
  await app.close(); // closes the client too
}
main();
// #endregion
