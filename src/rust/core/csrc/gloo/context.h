#pragma once
#include "rendezvous/store.h"
