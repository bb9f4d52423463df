//! `edgeloop-sim modbus-device`: a simulated device of a class served as a Modbus TCP server. Its registers
//! follow the class's `[modbus]` map and hold the class generator's latest sample, updated at the sensors'
//! nominal rates (times `speed`). Reading an unmapped register is answered with the exception a real device
//! gives (illegal data address); unsupported functions with illegal function.

use crate::signals::Generator;
use anyhow::Context;
use edgeloop_common::config::ClassConfig;
use edgeloop_common::modbus::{ModbusMap, Table};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_modbus::{ExceptionCode, Request, Response};
use tokio_util::sync::CancellationToken;

/// The device's register tables.
#[derive(Debug, Default)]
pub struct Tables {
    holding: HashMap<u16, u16>,
    input: HashMap<u16, u16>,
    /// Samples written into the registers so far.
    pub updates: u64,
}

impl Tables {
    fn table(&self, t: Table) -> &HashMap<u16, u16> {
        match t {
            Table::Holding => &self.holding,
            Table::Input => &self.input,
        }
    }

    /// Reads `count` registers from `addr`; every one must be mapped.
    pub fn read(&self, t: Table, addr: u16, count: u16) -> Result<Vec<u16>, ExceptionCode> {
        if count == 0 || count > 125 {
            return Err(ExceptionCode::IllegalDataValue);
        }
        (0..count)
            .map(|i| {
                addr.checked_add(i)
                    .and_then(|a| self.table(t).get(&a).copied())
                    .ok_or(ExceptionCode::IllegalDataAddress)
            })
            .collect()
    }

    /// Writes a sample's values into the registers mapped to its sensor.
    pub fn write_sample(&mut self, map: &ModbusMap, sensor: &str, values: &[f64]) {
        for (reg, v) in map.of(sensor).zip(values) {
            let table = match reg.table {
                Table::Holding => &mut self.holding,
                Table::Input => &mut self.input,
            };
            for (i, w) in reg.encode(*v).into_iter().enumerate() {
                table.insert(reg.address + i as u16, w);
            }
        }
        self.updates += 1;
    }
}

/// The Modbus service: answers from the shared tables.
#[derive(Clone)]
struct Service {
    tables: Arc<Mutex<Tables>>,
}

impl tokio_modbus::server::Service for Service {
    type Request = Request<'static>;
    type Response = Response;
    type Exception = ExceptionCode;
    type Future = std::future::Ready<Result<Response, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        let mut t = self.tables.lock().unwrap_or_else(|p| p.into_inner());
        std::future::ready(match req {
            Request::ReadHoldingRegisters(addr, n) => {
                t.read(Table::Holding, addr, n).map(Response::ReadHoldingRegisters)
            }
            Request::ReadInputRegisters(addr, n) => t.read(Table::Input, addr, n).map(Response::ReadInputRegisters),
            Request::WriteSingleRegister(addr, v) if t.holding.contains_key(&addr) => {
                t.holding.insert(addr, v);
                Ok(Response::WriteSingleRegister(addr, v))
            }
            Request::WriteSingleRegister(..) => Err(ExceptionCode::IllegalDataAddress),
            _ => Err(ExceptionCode::IllegalFunction),
        })
    }
}

/// A running simulated Modbus device.
pub struct ModbusDevice {
    pub addr: SocketAddr,
    pub tables: Arc<Mutex<Tables>>,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Serves `class` (which must have a `[modbus]` map) on `listen` until `stop`, its registers fed by the
/// class's generator (seeded with `seed`) at `speed` times the sensors' nominal rates.
pub async fn start(
    class: ClassConfig,
    listen: SocketAddr,
    seed: u64,
    speed: f64,
    stop: CancellationToken,
) -> anyhow::Result<ModbusDevice> {
    let map = class.modbus.clone().with_context(|| format!("class `{}` has no [modbus] register map", class.class))?;
    anyhow::ensure!(speed.is_finite() && speed > 0.0, "--speed must be > 0");
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    let tables: Arc<Mutex<Tables>> = Arc::default();
    let mut generator = Generator::new(class.clone(), seed, edgeloop_common::unix_millis());
    // The first sample of every mapped sensor is in place before the first client connects.
    let mapped: Vec<(usize, String, f64)> = class
        .sensors
        .iter()
        .enumerate()
        .filter(|(_, s)| map.of(&s.name).next().is_some())
        .map(|(i, s)| (i, s.name.clone(), s.rate_hz))
        .collect();
    {
        let mut t = tables.lock().unwrap_or_else(|p| p.into_inner());
        for (i, name, _) in &mapped {
            if let Some(s) = generator.next(*i) {
                t.write_sample(&map, name, &s.values);
            }
        }
    }
    let fastest = mapped.iter().map(|m| m.2).fold(0.0f64, f64::max);
    let period = Duration::from_secs_f64(1.0 / (fastest * speed)).max(Duration::from_millis(1));
    let (feed_tables, feed_stop, feed_map) = (tables.clone(), stop.clone(), map.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! { _ = feed_stop.cancelled() => return, _ = tick.tick() => {} }
            let mut t = feed_tables.lock().unwrap_or_else(|p| p.into_inner());
            for (i, name, _) in &mapped {
                if let Some(s) = generator.next(*i) {
                    t.write_sample(&feed_map, name, &s.values);
                }
            }
        }
    });
    let service = Service { tables: tables.clone() };
    let task = tokio::spawn(async move {
        let server = tokio_modbus::server::tcp::Server::new(listener);
        let on_connected = |stream, peer| {
            let service = service.clone();
            async move { tokio_modbus::server::tcp::accept_tcp_connection(stream, peer, |_| Ok(Some(service.clone()))) }
        };
        let on_error = |e: std::io::Error| tracing::debug!(error = %e, "Modbus client connection ended with an error");
        server.serve_until(&on_connected, on_error, stopped(stop)).await?;
        Ok(())
    });
    Ok(ModbusDevice { addr, tables, task })
}

async fn stopped(stop: CancellationToken) {
    stop.cancelled().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_modbus::client::Reader;

    #[tokio::test]
    async fn serves_the_generators_values_through_the_map_and_refuses_unmapped_registers() {
        let class = crate::class_config("factory-machine-temperature").unwrap();
        let stop = CancellationToken::new();
        let dev = start(class.clone(), "127.0.0.1:0".parse().unwrap(), 7, 600.0, stop.clone()).await.unwrap();
        let mut ctx = tokio_modbus::client::tcp::connect_slave(dev.addr, tokio_modbus::Slave(1)).await.unwrap();
        let words = ctx.read_holding_registers(0, 1).await.unwrap().unwrap();
        let reg = &class.modbus.as_ref().unwrap().registers[0];
        let celsius = reg.decode(&words).unwrap();
        assert!((40.0..100.0).contains(&celsius), "a machine bearing's temperature, got {celsius}");
        assert_eq!(ctx.read_holding_registers(100, 1).await.unwrap(), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(ctx.read_input_registers(0, 1).await.unwrap(), Err(ExceptionCode::IllegalDataAddress));
        assert_eq!(ctx.read_holding_registers(0, 0).await.unwrap(), Err(ExceptionCode::IllegalDataValue));
        // At 600 times the nominal rate (one reading a minute), a new reading every 100 ms.
        let before = dev.tables.lock().unwrap().updates;
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(dev.tables.lock().unwrap().updates >= before + 3);
        stop.cancel();
        dev.task.await.unwrap().unwrap();
    }
}
