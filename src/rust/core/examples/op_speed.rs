use tch::{Device, Kind, Tensor};
fn main() {
    tch::set_num_threads(2);
    let a = Tensor::rand([128, 2000], (Kind::Float, Device::Cpu));
    let b = Tensor::rand([128, 2000], (Kind::Float, Device::Cpu));
    let w = Tensor::rand([2000, 128], (Kind::Float, Device::Cpu));
    let n = 200;
    let time = |name: &str, f: &dyn Fn() -> Tensor| {
        let _ = f();
        let t = std::time::Instant::now();
        for _ in 0..n {
            let _ = f();
        }
        println!("{name:>10}: {:.3} ms", t.elapsed().as_secs_f64() / n as f64 * 1e3);
    };
    time("add", &|| &a + &b);
    time("mul", &|| &a * &b);
    time("log", &|| a.log());
    time("exp", &|| a.exp());
    time("softplus", &|| a.softplus());
    time("log1p(exp)", &|| a.exp().log1p());
    time("lgamma", &|| a.lgamma());
    time("sum", &|| a.sum_dim_intlist(-1, false, Kind::Float));
    time("softmax", &|| a.softmax(-1, Kind::Float));
    time("matmul", &|| a.matmul(&w));
    let nz = Tensor::randint(128 * 2000, [60000], (Kind::Int64, Device::Cpu));
    let v = Tensor::rand([60000], (Kind::Float, Device::Cpu));
    let rowi = Tensor::randint(128, [60000], (Kind::Int64, Device::Cpu));
    time("index_sel", &|| a.reshape([-1]).index_select(0, &nz));
    time("index_add", &|| Tensor::zeros([128], (Kind::Float, Device::Cpu)).index_add(0, &rowi, &v));
    time("lgamma60k", &|| v.lgamma());
    time("where", &|| a.where_self(&a.lt(0.5), &b));
}

#[allow(dead_code)]
fn unused() {}
